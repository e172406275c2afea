//! End-to-end checks of the public training pieces as the trainer will use them: the resolved TOML of the
//! defaults, and the rendered metrics report of a small evaluation.

use derma::train::config::TrainConfig;
use derma::train::metrics::{compute_report, render_report};

#[test]
fn default_config_toml_names_every_section() {
    let text = TrainConfig::default().to_toml_string().unwrap();
    println!("{text}");
    for key in ["batch_size = 32", "lr = 0.00005", "[plateau]", "[loss_scale]", "[early_stopping]", "[[unfreeze]]"] {
        assert!(text.contains(key), "missing {key:?} in\n{text}");
    }
    assert_eq!(text.matches("[[unfreeze]]").count(), 5);
}

#[test]
fn rendered_report_lines_up() {
    let y_true = [0usize, 0, 1, 1, 2, 2, 2];
    let y_pred = [0usize, 1, 1, 1, 2, 0, 2];
    #[rustfmt::skip]
    let probs = [
        0.8f32, 0.1, 0.1,  0.4, 0.5, 0.1,  0.1, 0.8, 0.1,  0.2, 0.7, 0.1,
        0.1, 0.1, 0.8,  0.5, 0.2, 0.3,  0.2, 0.2, 0.6,
    ];
    let r = compute_report(&y_true, &y_pred, Some(&probs), 3).unwrap();
    let names = vec!["MEL".to_string(), "NV".to_string(), "VASC".to_string()];
    let text = render_report(&r, &names);
    println!("{text}");
    // accuracy 5/7; balanced (1/2 + 2/2 + 2/3)/3.
    assert!(text.contains(&format!("{:.4}", 5.0 / 7.0)));
    assert!(text.contains(&format!("{:.4}", (0.5 + 1.0 + 2.0 / 3.0) / 3.0)));
    // Every table row has the same width.
    let rows: Vec<&str> = text.lines().take(4).collect();
    assert!(rows.iter().all(|l| l.chars().count() == rows[0].chars().count()), "{rows:?}");
}
