//! `derma weights fetch` and `--pretrained imagenet` against a loopback HTTP server started here: a good file, a
//! wrong hash, a transfer cut short (then resumed with a Range request), a partial file left by an earlier run, a
//! 404, and no server at all. Nothing leaves 127.0.0.1.

use derma::io::fetch::{self, FetchOptions, Remote};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A few hundred KB of fixed pseudo-random bytes.
fn payload() -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What the server does for one path.
#[derive(Clone)]
enum Behaviour {
    /// Serves the bytes, honouring `Range: bytes=N-`.
    Serve(Vec<u8>),
    /// The first request without a Range gets the full Content-Length but only the first `cut` bytes, then the
    /// connection closes; later requests are served normally.
    CutFirst(Vec<u8>, usize),
}

struct Server {
    base: String,
    /// Each request's path and Range header (empty when none).
    log: Arc<Mutex<Vec<(String, String)>>>,
}

fn serve(routes: Vec<(String, Behaviour)>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/models/", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    std::thread::spawn(move || {
        let mut cut_done = false;
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            handle(stream, &routes, &seen, &mut cut_done);
        }
    });
    Server { base, log }
}

fn handle(stream: TcpStream, routes: &[(String, Behaviour)], log: &Mutex<Vec<(String, String)>>, cut_done: &mut bool) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut range = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("range")
        {
            range = v.trim().to_string();
        }
    }
    log.lock().unwrap().push((path.clone(), range.clone()));
    let mut out = stream;
    let name = path.rsplit('/').next().unwrap_or("");
    let Some((_, b)) = routes.iter().find(|(n, _)| n == name) else {
        let _ = out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found");
        return;
    };
    let (bytes, cut) = match b {
        Behaviour::Serve(v) => (v, None),
        Behaviour::CutFirst(v, n) if range.is_empty() && !*cut_done => {
            *cut_done = true;
            (v, Some(*n))
        }
        Behaviour::CutFirst(v, _) => (v, None),
    };
    let start: usize = range.strip_prefix("bytes=").and_then(|r| r.trim_end_matches('-').parse().ok()).unwrap_or(0);
    let head = if start > 0 {
        format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: \
             close\r\n\r\n",
            bytes.len() - start,
            bytes.len() - 1,
            bytes.len()
        )
    } else {
        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", bytes.len())
    };
    let _ = out.write_all(head.as_bytes());
    let body = &bytes[start..];
    let _ = out.write_all(&body[..cut.unwrap_or(body.len())]);
    let _ = out.flush();
}

fn options(base: &str, cache: &Path) -> FetchOptions {
    FetchOptions {
        base_url: base.to_string(),
        cache_dir: cache.to_path_buf(),
        retries: 2,
        retry_wait: Duration::ZERO,
        progress: false,
    }
}

/// A fixture whose name carries its own hash prefix, as torchvision's files do.
fn fixture_name(bytes: &[u8], stem: &str) -> String {
    format!("{stem}-{}.pth", &hex(bytes)[..8])
}

fn cache_listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_good_file_is_downloaded_verified_and_then_served_from_the_cache() {
    let data = payload();
    let name = fixture_name(&data, "tiny");
    let server = serve(vec![(name.clone(), Behaviour::Serve(data.clone()))]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let remote = Remote::from_file_name(&name).unwrap();
    let path = fetch::ensure(&remote, &options(&server.base, &cache)).unwrap();
    assert_eq!(path, cache.join(&name));
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(cache_listing(&cache), vec![name.clone()], "no partial file left behind");
    assert_eq!(server.log.lock().unwrap().len(), 1);
    // The second time: verified from the cache, no request.
    fetch::ensure(&remote, &options(&server.base, &cache)).unwrap();
    assert_eq!(server.log.lock().unwrap().len(), 1);
    // A damaged cached copy is noticed and replaced.
    std::fs::write(&path, b"damaged").unwrap();
    fetch::ensure(&remote, &options(&server.base, &cache)).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(server.log.lock().unwrap().len(), 2);
}

#[test]
fn a_wrong_hash_is_refused_and_nothing_is_kept() {
    let data = payload();
    let name = "tiny-0badc0de.pth".to_string();
    let server = serve(vec![(name.clone(), Behaviour::Serve(data.clone()))]);
    let tmp = tempfile::tempdir().unwrap();
    let remote = Remote::from_file_name(&name).unwrap();
    let err = format!("{:#}", fetch::ensure(&remote, &options(&server.base, tmp.path())).unwrap_err());
    assert!(err.contains(&hex(&data)) && err.contains("0badc0de") && err.contains("SHA-256"), "{err}");
    assert!(cache_listing(tmp.path()).is_empty(), "{:?}", cache_listing(tmp.path()));
}

#[test]
fn a_cut_transfer_is_resumed_with_a_range_request() {
    let data = payload();
    let name = fixture_name(&data, "cut");
    let cut = 123_457;
    let server = serve(vec![(name.clone(), Behaviour::CutFirst(data.clone(), cut))]);
    let tmp = tempfile::tempdir().unwrap();
    let remote = Remote::from_file_name(&name).unwrap();
    let path = fetch::ensure(&remote, &options(&server.base, tmp.path())).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    let log = server.log.lock().unwrap().clone();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0].1, "");
    assert_eq!(log[1].1, format!("bytes={cut}-"));
}

#[test]
fn a_partial_file_from_an_earlier_run_is_resumed() {
    let data = payload();
    let name = fixture_name(&data, "resume");
    let server = serve(vec![(name.clone(), Behaviour::Serve(data.clone()))]);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join(format!("{name}.partial")), &data[..77_777]).unwrap();
    let remote = Remote::from_file_name(&name).unwrap();
    let path = fetch::ensure(&remote, &options(&server.base, tmp.path())).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    let log = server.log.lock().unwrap().clone();
    assert_eq!(log, vec![(format!("/models/{name}"), "bytes=77777-".to_string())]);
}

#[test]
fn not_found_and_offline_say_what_to_download_by_hand() {
    let server = serve(vec![]);
    let tmp = tempfile::tempdir().unwrap();
    let remote = fetch::lookup("imagenet").unwrap();
    let err = format!("{:#}", fetch::ensure(&remote, &options(&server.base, tmp.path())).unwrap_err());
    let url = format!("{}efficientnet_b0_rwightman-7f5810bc.pth", server.base);
    let dest = tmp.path().join("efficientnet_b0_rwightman-7f5810bc.pth");
    assert!(err.contains("404") && err.contains(&url) && err.contains(dest.to_str().unwrap()), "{err}");
    assert_eq!(server.log.lock().unwrap().len(), 1, "a 404 is not retried");

    // A port nobody listens on: refused at once, no retries, the same instructions.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}/models/");
    let err = format!("{:#}", fetch::ensure(&remote, &options(&base, tmp.path())).unwrap_err());
    assert!(
        err.contains("cannot download") && err.contains("by hand") && err.contains(dest.to_str().unwrap()),
        "{err}"
    );
    assert!(cache_listing(tmp.path()).iter().all(|n| !n.ends_with(".pth")));
}

fn derma(args: &[&str], base: &str, cache: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_derma"))
        .args(args)
        .env(fetch::BASE_URL_ENV, base)
        .env(fetch::CACHE_DIR_ENV, cache)
        .output()
        .unwrap()
}

#[test]
fn weights_fetch_and_pretrained_imagenet_through_the_binary() {
    let data = payload();
    let name = fixture_name(&data, "tiny");
    let server = serve(vec![(name.clone(), Behaviour::Serve(data.clone()))]);
    let tmp = tempfile::tempdir().unwrap();
    let cache: PathBuf = tmp.path().join("cache");

    let out = derma(&["weights", "fetch", &name, "--quiet"], &server.base, &cache);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), cache.join(&name).to_str().unwrap());
    assert_eq!(std::fs::read(cache.join(&name)).unwrap(), data);

    // --cache-dir overrides the environment.
    let other = tmp.path().join("other");
    let out =
        derma(&["weights", "fetch", &name, "--quiet", "--cache-dir", other.to_str().unwrap()], &server.base, &cache);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(other.join(&name).is_file());

    // The real name is not on this server: `weights fetch` (default name) and `train --pretrained imagenet` both
    // fail before doing anything else, naming the file and where to put it.
    let dest = cache.join("efficientnet_b0_rwightman-7f5810bc.pth");
    for args in [
        vec!["weights", "fetch"],
        vec!["train", "--pretrained", "imagenet", "--out", tmp.path().join("run").to_str().unwrap(), "--quiet"],
    ] {
        let out = derma(&args, &server.base, &cache);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("404") && err.contains("by hand") && err.contains(dest.to_str().unwrap()), "{err}");
    }
    assert!(!tmp.path().join("run").join("synthetic-data").exists(), "train must fail before making data");

    let out = derma(&["weights", "list"], &server.base, &cache);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("imagenet") && text.contains("not fetched"), "{text}");
}
