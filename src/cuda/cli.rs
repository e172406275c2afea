//! `derma gpu-info`: what this machine offers for CUDA, the kernels' ptxas report, and copy bandwidth.

use anyhow::{Result, anyhow, bail};
use std::time::Instant;

use super::emu::sys as emu_sys;
use super::kernels::DevSlice;
use super::{DeviceRequest, Gpu, Probe, Selected, build_info, parse_device, probe, select_from};

/// Arguments of `derma gpu-info`.
#[derive(clap::Args, Debug)]
pub struct GpuInfoArgs {
    /// Print the probe as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print ptxas's per-kernel resource report (registers, shared memory, spills per architecture).
    #[arg(long)]
    pub resources: bool,
    /// Measure host↔device and device↔device copy bandwidth and a streaming kernel on this device.
    #[arg(long)]
    pub bandwidth: bool,
    /// Device for --bandwidth: cuda, cuda:N, or emu (a test device: runs the CUDA code path's kernels on the CPU
    /// through the emulator; its numbers are host memcpy and emulation speed).
    #[arg(long, default_value = "cuda", value_parser = parse_device)]
    pub device: DeviceRequest,
    /// MiB moved per bandwidth measurement.
    #[arg(long, default_value_t = 256)]
    pub mib: usize,
}

/// Runs `derma gpu-info`.
pub fn run(args: &GpuInfoArgs) -> Result<()> {
    let p = probe();
    let emulated = emu_sys::has_kernel("silu_fwd_f32");
    if args.json {
        let mut doc = p.to_json();
        doc["emulated_device"] = serde_json::json!({
            "available": emulated,
            "flavour": emu_sys::flavour(),
            "sms": super::device::EMULATED_SMS,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("{p}");
        if emulated {
            println!(
                "Emulated device (--device emu): kernels/*.cu compiled for the host ({} build), run on the CPU",
                emu_sys::flavour()
            );
        } else {
            println!("Emulated device (--device emu): not in this build");
        }
    }
    if args.resources {
        if build_info::KERNELS_BUILT {
            print!("{}", build_info::RESOURCES);
        } else {
            println!("no kernels in this binary: {}", build_info::KERNELS_ABSENT_REASON);
        }
    }
    if args.bandwidth {
        let sel = bandwidth_device(&p, args.device)?;
        let gpu = Gpu::open(&sel)?;
        bandwidth(&gpu, args.mib.max(1) << 20)?;
    }
    Ok(())
}

/// The device `--bandwidth` measures. Only a CUDA device (or the emulated one) can be measured, so the message
/// never suggests `--device cpu` (which the general device selection does, for commands that can run on the CPU).
fn bandwidth_device(p: &Probe, request: DeviceRequest) -> Result<Selected> {
    let ordinal = match request {
        DeviceRequest::Cuda(n) => n,
        DeviceRequest::Auto => 0,
        DeviceRequest::Emu => return Ok(Selected::Emulated),
        DeviceRequest::Cpu => bail!("--bandwidth measures a CUDA device: use --device cuda or --device cuda:N"),
    };
    select_from(p, ordinal).map_err(|why| {
        anyhow!(
            "--bandwidth needs a CUDA device, and cuda:{ordinal} cannot be used:\n  - {}\n(on a machine without one \
             there is no GPU bandwidth to measure)",
            why.join("\n  - ")
        )
    })
}

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// Best of 5 timings of host→device, device→host (pageable memory), device→device, and a read+write kernel.
fn bandwidth(gpu: &Gpu, bytes: usize) -> Result<()> {
    let host = vec![1.0f32; bytes / 4];
    let a = gpu.upload(&host)?;
    let b = gpu.zeros(bytes)?;
    let best = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?; // warm-up
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = Instant::now();
            f()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let h2d = best(&mut || gpu.write(&a, 0, &host))?;
    let mut back = vec![0.0f32; bytes / 4];
    let d2h = best(&mut || gpu.read(&a, 0, &mut back))?;
    let d2d = best(&mut || {
        gpu.copy(&b, &a, bytes)?;
        gpu.sync()
    })?;
    let n = bytes / 4;
    let kernel = best(&mut || {
        gpu.kernels.scale::<f32>(&gpu.stream, DevSlice::of(&b), DevSlice::of(&a), 2.0, n, false)?;
        gpu.sync()
    })?;
    println!("copy bandwidth on {} ({} MiB, best of 5):", gpu.info.name, bytes >> 20);
    println!("  host->device (pageable): {:8.1} GB/s", gbps(bytes, h2d));
    println!("  device->host (pageable): {:8.1} GB/s", gbps(bytes, d2h));
    println!(
        "  device->device memcpy:   {:8.1} GB/s (read + write: {:.1} GB/s moved)",
        gbps(bytes, d2d),
        gbps(2 * bytes, d2d)
    );
    println!("  scale_f32 kernel:        {:8.1} GB/s moved (read + write)", gbps(2 * bytes, kernel));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_without_a_gpu_does_not_suggest_the_cpu() {
        for request in [DeviceRequest::Cuda(0), DeviceRequest::Cuda(3), DeviceRequest::Auto, DeviceRequest::Cpu] {
            let e = format!("{:#}", bandwidth_device(&Probe::default(), request).err().unwrap());
            assert!(!e.contains("--device cpu") && !e.contains("--device auto"), "{e}");
            assert!(e.contains("CUDA device"), "{e}");
        }
        // The emulated device needs no driver.
        assert_eq!(bandwidth_device(&Probe::default(), DeviceRequest::Emu).unwrap(), Selected::Emulated);
    }
}
