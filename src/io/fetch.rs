//! Pretrained weights by name: downloaded once into a cache and verified the way torchvision verifies them.
//!
//! torchvision names each weight file after its SHA-256 (`efficientnet_b0_rwightman-7f5810bc.pth`: the digest
//! starts with `7f5810bc`), and `load_state_dict_from_url(check_hash=True)` compares the two. derma does the same,
//! on every download and whenever a cached file is used. Downloads go to `<file>.partial` in the cache folder,
//! are resumed with an HTTP Range request after an interruption (within a run, by retrying, and across runs), and
//! are renamed into place only once verified, so the cache never holds a partial or unverified file under the
//! final name.
//!
//! Where from: [`DEFAULT_BASE_URL`], or `$DERMA_WEIGHTS_BASE_URL` (a mirror, or a test server). Where to:
//! `$DERMA_WEIGHTS_DIR`, else `$XDG_CACHE_HOME/derma/weights`, else `~/.cache/derma/weights`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};

/// Where torchvision publishes its weights.
pub const DEFAULT_BASE_URL: &str = "https://download.pytorch.org/models/";
/// Overrides [`DEFAULT_BASE_URL`].
pub const BASE_URL_ENV: &str = "DERMA_WEIGHTS_BASE_URL";
/// Overrides the cache folder.
pub const CACHE_DIR_ENV: &str = "DERMA_WEIGHTS_DIR";

/// A weight file derma knows by name.
#[derive(Clone, Copy, Debug)]
pub struct KnownWeights {
    /// What users type: `--pretrained imagenet`, `derma weights fetch imagenet`.
    pub name: &'static str,
    /// The published file name, which carries the start of its SHA-256.
    pub file: &'static str,
    pub about: &'static str,
}

/// The named weights. The seed's `efficientnet_b0(pretrained=True)` loads the first.
pub const KNOWN: &[KnownWeights] = &[KnownWeights {
    name: "imagenet",
    file: "efficientnet_b0_rwightman-7f5810bc.pth",
    about: "torchvision's EfficientNet-B0 ImageNet-1k weights (IMAGENET1K_V1), what the seed's pretrained=True loads",
}];

/// A file to fetch: its name and the hash prefix that name carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    pub file: String,
    /// Lower-case hex digits the file's SHA-256 must start with.
    pub hash_prefix: String,
}

impl Remote {
    /// A file named like torchvision's weights, `<stem>-<hex digits>.<ext>`: the digits after the last `-` of the
    /// stem are the prefix of its SHA-256 (torchvision's rule: the first `-<hex>.` in the name).
    pub fn from_file_name(file: &str) -> Result<Self> {
        if file.is_empty() || file.contains(['/', '\\']) || file.starts_with('.') {
            bail!("{file:?} is not a plain file name");
        }
        let prefix = file
            .match_indices('-')
            .filter_map(|(i, _)| {
                let rest = &file[i + 1..];
                let dot = rest.find('.')?;
                let hex = &rest[..dot];
                (hex.len() >= 8 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
                    .then(|| hex.to_string())
            })
            .next()
            .with_context(|| {
                format!(
                    "{file:?} does not carry its hash: expected a name like `name-<8+ hex digits of its SHA-256>.pth`"
                )
            })?;
        Ok(Self { file: file.to_string(), hash_prefix: prefix })
    }
}

/// The weights a name stands for: one of [`KNOWN`], or a file name in torchvision's `name-<hash>.ext` form.
pub fn lookup(name: &str) -> Result<Remote> {
    if let Some(k) = KNOWN.iter().find(|k| k.name == name) {
        return Remote::from_file_name(k.file);
    }
    Remote::from_file_name(name).map_err(|e| {
        let names: Vec<String> = KNOWN.iter().map(|k| format!("{} ({})", k.name, k.file)).collect();
        anyhow!("unknown weights {name:?}: {e}; known names: {}", names.join(", "))
    })
}

/// True when `value` names weights rather than a file: one of [`KNOWN`].
pub fn is_known_name(value: &str) -> bool {
    KNOWN.iter().any(|k| k.name == value)
}

/// How to fetch.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Folder URL the file name is appended to.
    pub base_url: String,
    pub cache_dir: PathBuf,
    /// Further attempts after an interrupted transfer (each resumes where the last stopped).
    pub retries: u32,
    /// Wait before the first retry, doubled for each further one.
    pub retry_wait: Duration,
    /// A progress bar on stderr (drawn only when stderr is a terminal).
    pub progress: bool,
}

impl FetchOptions {
    /// The base URL and cache folder from the environment (see the module notes), 3 retries, a progress bar.
    pub fn from_env() -> Result<Self> {
        Ok(Self {
            base_url: std::env::var(BASE_URL_ENV).unwrap_or_else(|_| DEFAULT_BASE_URL.to_string()),
            cache_dir: default_cache_dir()?,
            retries: 3,
            retry_wait: Duration::from_secs(2),
            progress: true,
        })
    }

    fn url(&self, remote: &Remote) -> String {
        format!("{}/{}", self.base_url.trim_end_matches('/'), remote.file)
    }
}

/// `$DERMA_WEIGHTS_DIR`, else `$XDG_CACHE_HOME/derma/weights`, else `$HOME/.cache/derma/weights`.
pub fn default_cache_dir() -> Result<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var(CACHE_DIR_ENV) {
        return Ok(d);
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return Ok(d.join("derma").join("weights"));
    }
    match var("HOME") {
        Some(h) => Ok(h.join(".cache").join("derma").join("weights")),
        None => bail!("no cache folder for weights: set {CACHE_DIR_ENV} (or HOME)"),
    }
}

/// Lower-case hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether the file at `path` has the hash its name promises; the digest is returned either way.
fn verify(path: &Path, remote: &Remote) -> Result<(bool, String)> {
    let digest = sha256_file(path)?;
    Ok((digest.starts_with(&remote.hash_prefix), digest))
}

/// The path of `remote` in the cache, downloading it first when it is missing (or when the cached copy fails its
/// hash, which is then replaced with a notice).
pub fn ensure(remote: &Remote, opts: &FetchOptions) -> Result<PathBuf> {
    let dest = opts.cache_dir.join(&remote.file);
    if dest.is_file() {
        let (ok, digest) = verify(&dest, remote)?;
        if ok {
            return Ok(dest);
        }
        eprintln!(
            "warning: the cached {} has SHA-256 {digest}, which does not start with {}: it is damaged; downloading \
             it again",
            dest.display(),
            remote.hash_prefix
        );
        std::fs::remove_file(&dest).with_context(|| format!("cannot remove the damaged {}", dest.display()))?;
    }
    download(remote, opts, &dest)?;
    Ok(dest)
}

/// Resolves `--pretrained`: a known name (`imagenet`) becomes the cached file, fetched if needed; anything else is
/// a path and is returned as given.
pub fn resolve_pretrained(value: &Path) -> Result<PathBuf> {
    match value.to_str() {
        Some(name) if is_known_name(name) => {
            let remote = lookup(name)?;
            ensure(&remote, &FetchOptions::from_env()?).with_context(|| format!("--pretrained {name}"))
        }
        _ => Ok(value.to_path_buf()),
    }
}

/// Why one attempt at the transfer stopped.
enum Stop {
    /// The connection broke or timed out mid-way: retry, resuming from what was written.
    Interrupted(String),
    /// Retrying will not help (unreachable host, 404, ...).
    Fatal(anyhow::Error),
}

/// Downloads `remote` to `dest` through `<dest>.partial`, retrying interrupted transfers, then verifies it.
fn download(remote: &Remote, opts: &FetchOptions, dest: &Path) -> Result<()> {
    let url = opts.url(remote);
    std::fs::create_dir_all(&opts.cache_dir)
        .with_context(|| format!("cannot create the weights cache {}", opts.cache_dir.display()))?;
    let partial = opts.cache_dir.join(format!("{}.partial", remote.file));
    let by_hand = || {
        format!(
            "To install it by hand, download {url} (on any machine with network access) and put it at {}, or pass \
             the file's path to --pretrained.",
            dest.display()
        )
    };
    let agent = agent(&url);
    let mut attempt = 0;
    loop {
        match transfer(&agent, &url, &partial, opts.progress) {
            Ok(()) => break,
            Err(Stop::Fatal(e)) => bail!("{e:#}\n{}", by_hand()),
            Err(Stop::Interrupted(why)) if attempt < opts.retries => {
                attempt += 1;
                let have = std::fs::metadata(&partial).map_or(0, |m| m.len());
                eprintln!(
                    "download of {} interrupted ({why}) after {have} bytes; resuming (attempt {} of {})",
                    remote.file,
                    attempt + 1,
                    opts.retries + 1
                );
                std::thread::sleep(opts.retry_wait * 2u32.saturating_pow(attempt - 1));
            }
            Err(Stop::Interrupted(why)) => {
                bail!(
                    "the download of {url} failed {} times, last: {why}; running the command again resumes it from \
                     {}\n{}",
                    opts.retries + 1,
                    partial.display(),
                    by_hand()
                )
            }
        }
    }
    let (ok, digest) = verify(&partial, remote)?;
    if !ok {
        let _ = std::fs::remove_file(&partial);
        bail!(
            "the file downloaded from {url} has SHA-256 {digest}, which does not start with {} as its name says: it \
             is damaged or not the expected file, and was deleted; try again, or {}",
            remote.hash_prefix,
            by_hand()
        );
    }
    std::fs::rename(&partial, dest)
        .with_context(|| format!("cannot move {} to {}", partial.display(), dest.display()))?;
    Ok(())
}

fn agent(url: &str) -> ureq::Agent {
    let loopback = ["http://127.0.0.1:", "http://localhost:", "http://[::1]:"].iter().any(|p| url.starts_with(p));
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .user_agent(concat!("derma/", env!("CARGO_PKG_VERSION")));
    if loopback {
        // A proxy from the environment can never reach this machine's own loopback server.
        config = config.proxy(None);
    }
    config.build().into()
}

/// One attempt: requests the bytes not yet in `partial` and appends them.
fn transfer(agent: &ureq::Agent, url: &str, partial: &Path, progress: bool) -> std::result::Result<(), Stop> {
    let have = std::fs::metadata(partial).map_or(0, |m| m.len());
    let mut request = agent.get(url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
    }
    // Failing before any response (no route, no name resolution, refused) means offline or a wrong URL, which
    // retrying will not fix; a timeout may pass.
    let response = request.call().map_err(|e| match e {
        ureq::Error::Timeout(_) => Stop::Interrupted(format!("{e}")),
        _ => Stop::Fatal(anyhow!("cannot download {url}: {e} (is this machine offline?)")),
    })?;
    let status = response.status().as_u16();
    let length = response.body().content_length();
    let (append, start, total) = match status {
        200 => (false, 0, length),
        206 => {
            let range = response.headers().get("content-range").and_then(|v| v.to_str().ok()).unwrap_or("");
            match parse_content_range(range) {
                Some((first, total)) if first == have => (true, have, total.or(length.map(|l| l + have))),
                _ => {
                    // Not the part asked for: start over rather than splice mismatched bytes.
                    let _ = std::fs::remove_file(partial);
                    return Err(Stop::Interrupted(format!("the server sent range {range:?}, not bytes {have}-")));
                }
            }
        }
        416 if have > 0 => {
            // The partial file is not a prefix of the file (it is as long or longer): start over.
            let _ = std::fs::remove_file(partial);
            return Err(Stop::Interrupted("the partial download does not fit the file; starting over".into()));
        }
        404 => return Err(Stop::Fatal(anyhow!("{url} was not found (HTTP 404)"))),
        500..=599 => return Err(Stop::Interrupted(format!("the server answered HTTP {status}"))),
        _ => return Err(Stop::Fatal(anyhow!("the server answered HTTP {status} for {url}"))),
    };
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(partial)
        .map_err(|e| Stop::Fatal(anyhow!("cannot write {}: {e}", partial.display())))?;
    let bar = if progress {
        ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec}, {eta} left")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(url.rsplit('/').next().unwrap_or(url).to_string());
    bar.set_position(start);
    let mut body = response.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut written = start;
    let outcome = loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(Stop::Interrupted(format!("{e}"))),
        };
        if let Err(e) = file.write_all(&buf[..n]) {
            break Err(Stop::Fatal(anyhow!("cannot write {} (disk full?): {e}", partial.display())));
        }
        written += n as u64;
        bar.set_position(written);
    };
    bar.finish_and_clear();
    // Keep what arrived, durably, so the next attempt resumes from it.
    file.sync_all().map_err(|e| Stop::Fatal(anyhow!("cannot flush {}: {e}", partial.display())))?;
    outcome?;
    match total {
        Some(t) if written < t => Err(Stop::Interrupted(format!("the transfer ended after {written} of {t} bytes"))),
        Some(t) if written > t => {
            let _ = std::fs::remove_file(partial);
            Err(Stop::Fatal(anyhow!("the server sent {written} bytes for a {t}-byte file")))
        }
        _ => Ok(()),
    }
}

/// `bytes FIRST-LAST/TOTAL` (TOTAL may be `*`): the first byte and the total size when known.
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (first, _) = range.split_once('-')?;
    Some((first.trim().parse().ok()?, total.trim().parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_prefix_comes_from_the_file_name() {
        let r = lookup("imagenet").unwrap();
        assert_eq!(r, Remote { file: "efficientnet_b0_rwightman-7f5810bc.pth".into(), hash_prefix: "7f5810bc".into() });
        assert_eq!(Remote::from_file_name("efficientnet_b4_rwightman-23ab8bcd.pth").unwrap().hash_prefix, "23ab8bcd");
        assert_eq!(Remote::from_file_name("tiny-0123456789abcdef.bin").unwrap().hash_prefix, "0123456789abcdef");
        for bad in ["noh.pth", "x-1234.pth", "x-ABCDEF12.pth", "../x-7f5810bc.pth", "x-7f5810bz.pth", ""] {
            assert!(Remote::from_file_name(bad).is_err(), "{bad}");
        }
        let e = lookup("imagenet21k").unwrap_err().to_string();
        assert!(e.contains("imagenet") && e.contains("efficientnet_b0_rwightman-7f5810bc.pth"), "{e}");
    }

    #[test]
    fn content_range_parsing() {
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }
}
