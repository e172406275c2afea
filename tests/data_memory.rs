//! Requests too large for this machine end in a clear error naming the flag, never in an allocation abort
//! (exit 134, "memory allocation failed").

mod data_support;

use data_support::*;

#[test]
fn train_with_an_absurd_image_size_is_refused_up_front() {
    let tmp = tempfile::tempdir().unwrap();
    synth_isic(&tmp.path().join("data"), 8, 1);
    let o = derma(tmp.path(), &["train", "--data", "data", "--image-size", "100000", "--epochs", "1", "--out", "run"]);
    assert_clean_failure(&o);
    let err = stderr(&o);
    assert!(err.contains("--image-size 100000 is out of range") && err.contains("2048"), "{err}");
    assert!(!tmp.path().join("data").join(".derma-cache-100000").exists());
}

#[test]
fn train_whose_activations_cannot_fit_names_memory_and_the_flags() {
    let tmp = tempfile::tempdir().unwrap();
    synth_isic(&tmp.path().join("data"), 8, 2);
    // 100000 images of 2048x2048 per step: hundreds of TiB of activations on any machine.
    let o = derma(
        tmp.path(),
        &["train", "--data", "data", "--image-size", "2048", "--batch-size", "100000", "--epochs", "1", "--out", "run"],
    );
    assert_clean_failure(&o);
    let err = stderr(&o);
    assert!(err.contains("training with --batch-size 100000 at --image-size 2048 needs at least"), "{err}");
    assert!(err.contains("is available (MemAvailable)") && err.contains("lower --batch-size or --image-size"), "{err}");
}

#[test]
fn model_summary_with_too_many_classes_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let o = derma(tmp.path(), &["model", "summary", "--classes", "100000000"]);
    assert_clean_failure(&o);
    let err = stderr(&o);
    // B0 with the torchvision head: 1280·C + C classifier parameters on top of the 4,007,548 of the backbone.
    let params = 4_007_548u64 + 1281 * 100_000_000;
    assert!(err.contains(&format!("--classes 100000000 ({params} parameters) needs at least")), "{err}");
    assert!(err.contains("MemAvailable") && err.contains("lower --classes"), "{err}");
    let o = derma(tmp.path(), &["model", "summary", "--classes", "0"]);
    assert_clean_failure(&o);
    let o = derma(tmp.path(), &["model", "summary", "--classes", "7", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&o)["total_params"].as_u64().unwrap(), 4_007_548 + 1281 * 7);
}

#[test]
fn eval_sizes_its_memory_by_the_images_it_scores() {
    let tmp = tempfile::tempdir().unwrap();
    synth_isic(&tmp.path().join("data"), 24, 3);
    let t = derma(
        tmp.path(),
        &[
            "train",
            "--data",
            "data",
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--out",
            "run",
            "--quiet",
        ],
    );
    assert!(t.status.success(), "{}", stderr(&t));
    // A batch larger than the data is one batch of all images, not a refusal or an abort.
    let e = derma(
        tmp.path(),
        &[
            "eval",
            "--checkpoint",
            "run/best.safetensors",
            "--data",
            "data",
            "--split",
            "all",
            "--batch-size",
            "100000000",
        ],
    );
    assert!(e.status.success(), "{}", stderr(&e));
}
