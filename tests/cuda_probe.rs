//! Device selection on whatever machine runs the tests: never a panic, and a missing driver is named.

use derma::cuda::{DeviceRequest, Selected, probe, select, select_from};

#[test]
fn cuda_request_fails_cleanly_or_succeeds_consistently() {
    let p = probe();
    println!("{p}");
    let cuda = select(DeviceRequest::Cuda(0));
    let auto = select(DeviceRequest::Auto).expect("auto never fails");
    if !p.driver {
        let e = format!("{:#}", cuda.expect_err("no driver, so cuda must fail"));
        assert!(e.contains("libcuda.so"), "the error should name the missing driver: {e}");
        assert!(e.contains("--device cpu"), "the error should say what to do: {e}");
        assert_eq!(auto, Selected::Cpu);
    } else {
        // Where a driver exists, `cuda` works exactly when nothing is missing, and `auto` follows it.
        let missing = p.missing_for(0);
        assert_eq!(cuda.is_ok(), missing.is_empty(), "{missing:?}");
        assert_eq!(matches!(auto, Selected::Cuda(_)), missing.is_empty());
        if let Err(e) = cuda {
            let e = format!("{e:#}");
            assert!(missing.iter().all(|m| e.contains(m.as_str())), "{e}");
        }
    }
    assert_eq!(select(DeviceRequest::Cpu).unwrap(), Selected::Cpu);
}

#[test]
fn out_of_range_ordinal_is_an_error() {
    let p = probe();
    let e = select_from(&p, 999).expect_err("no machine has 1000 GPUs here");
    assert!(!e.is_empty());
}
