//! Shared helpers for integration tests.
#![allow(dead_code)]
use std::path::PathBuf;

/// The project's Python (venv with torch, transformers, tiktoken, PIL, pycocoevalcap), used to
/// compute reference outputs. `scripts/test.sh` exports CLIPCAP_PYTHON; the fallback matches
/// `scripts/venv.sh`'s default location.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("CLIPCAP_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = std::env::var("CLIPCAP_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let cache = std::env::var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"));
            cache.join("clipcap/venv-torch-2.11.0")
        });
    venv.join("bin/python")
}

/// Root of the repository (tests run with the package root as working directory).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a project Python script with arguments and panics with its stderr on failure.
pub fn run_python(args: &[&str]) -> String {
    let out = std::process::Command::new(python())
        .args(args)
        .current_dir(repo())
        .output()
        .expect("cannot start the project python (run scripts/venv.sh)");
    if !out.status.success() {
        panic!(
            "python {:?} failed:\n{}",
            args,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).unwrap()
}

/// Makes a random test bundle with scripts/make_test_bundle.py (`extra` are its flags).
pub fn make_bundle(dir: &std::path::Path, extra: &[&str]) {
    let mut args = vec![
        "scripts/make_test_bundle.py",
        "--out",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run_python(&args);
}

/// A random test bundle made once per test binary (kept in `cell`), with `make_bundle` flags.
pub fn bundle_once(
    cell: &'static std::sync::OnceLock<tempfile::TempDir>,
    flags: &[&str],
) -> &'static std::path::Path {
    cell.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        make_bundle(d.path(), flags);
        d
    })
    .path()
}

/// A PNG of `w`×`h` with a gradient and a square, deterministic for `seed`.
pub fn png(w: u32, h: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let inside = x > w / 4 && x < w / 2 && y > h / 4 && y < h / 2;
        if inside {
            image::Rgb([seed.wrapping_mul(37), 200, 30])
        } else {
            image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, seed])
        }
    });
    let mut out = std::io::Cursor::new(vec![]);
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A running `clipcap serve` on a free loopback port; killed on drop.
pub struct Server {
    pub child: std::process::Child,
    pub url: String,
    pub stderr_path: PathBuf,
}

impl Server {
    /// Starts the server with extra args and `CLIPCAP_*` env, and waits until /ready is 200.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_limited(args, env, None)
    }

    /// [`Server::start`] with every file the server writes capped at `file_kb` KiB
    /// (RLIMIT_FSIZE, SIGXFSZ ignored): writes past it fail as on a full disk.
    pub fn start_limited(args: &[&str], env: &[(&str, &str)], file_kb: Option<u64>) -> Server {
        use std::io::BufRead;
        // The server's stderr goes to a kept temp file, shown when a test fails.
        let (_file, stderr_path) = tempfile::NamedTempFile::new().unwrap().keep().unwrap();
        let bin = env!("CARGO_BIN_EXE_clipcap");
        let mut cmd = match file_kb {
            None => std::process::Command::new(bin),
            Some(kb) => {
                let mut c = std::process::Command::new("bash");
                c.args([
                    "-c",
                    &format!("trap '' XFSZ; ulimit -f {kb}; exec \"$0\" \"$@\""),
                    bin,
                ]);
                c
            }
        };
        cmd.arg("serve")
            .args(["--bind", "127.0.0.1:0", "--device", "cpu"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap());
        // Models loaded at run time are recorded beside the log, not in the working folder,
        // unless the test names a record (to restart on it).
        if !env.iter().any(|(k, _)| *k == "CLIPCAP_SERVED_RECORD") {
            let mut record = stderr_path.clone().into_os_string();
            record.push(".served.json");
            cmd.env("CLIPCAP_SERVED_RECORD", record);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting clipcap serve");
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let url = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(u) = l.strip_prefix("clipcap listening on ") {
                        break u.trim().to_string();
                    }
                }
                _ => panic!(
                    "server exited before listening:\n{}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                ),
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let s = Server {
            child,
            url,
            stderr_path,
        };
        let client = reqwest::blocking::Client::new();
        let t0 = std::time::Instant::now();
        loop {
            if let Ok(r) = client.get(format!("{}/ready", s.url)).send() {
                if r.status().is_success() {
                    break;
                }
            }
            if t0.elapsed().as_secs() > 120 {
                panic!("server not ready:\n{}", s.log());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        s
    }

    /// `GET /train/{id}` with the admin `token`.
    pub fn job(&self, token: &str, id: &str) -> serde_json::Value {
        reqwest::blocking::Client::new()
            .get(format!("{}/train/{id}", self.url))
            .bearer_auth(token)
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    /// An admin request (`Authorization: Bearer token`) to `path`: its status and JSON body
    /// (`Null` when it has none).
    pub fn admin(&self, method: &str, path: &str, token: &str) -> (u16, serde_json::Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = reqwest::blocking::Client::new()
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(serde_json::Value::Null))
    }

    /// Polls training job `id` until `pred` holds; panics with the job and the server log after
    /// `secs` seconds.
    pub fn wait_for_job(
        &self,
        token: &str,
        id: &str,
        secs: u64,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let t0 = std::time::Instant::now();
        loop {
            let j = self.job(token, id);
            if pred(&j) {
                return j;
            }
            assert!(
                t0.elapsed().as_secs() < secs,
                "job {id} stuck: {}\n{}",
                serde_json::to_string_pretty(&j).unwrap(),
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// A metric's value from /metrics (first sample whose line starts with `prefix`).
    pub fn metric(&self, prefix: &str) -> Option<f64> {
        let text = reqwest::blocking::get(format!("{}/metrics", self.url))
            .ok()?
            .text()
            .ok()?;
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr_path);
        let mut record = self.stderr_path.clone().into_os_string();
        record.push(".served.json");
        let _ = std::fs::remove_file(record);
    }
}

/// Runs the `clipcap` binary with `args`, panics with its stderr if it fails, and parses each
/// line it printed as JSON.
pub fn clipcap_json_lines<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clipcap"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("cannot start clipcap");
    assert!(
        out.status.success(),
        "clipcap failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Loads `bundle` in int8 and in f32 and checks their image encoders: the int8 one loads only
/// for int8, and its embeddings of `pixels` are within cosine 0.99 of f32's (the bar)
/// without being equal. Returns both bundles and f32's embeddings.
pub fn check_int8_encoder(
    bundle: &std::path::Path,
    pixels: &tch::Tensor,
) -> (
    clipcap::model::bundle::Bundle,
    clipcap::model::bundle::Bundle,
    tch::Tensor,
) {
    use clipcap::model::bundle::Bundle;
    use tch::{Device, Kind, Tensor};
    let int8 = Bundle::load(bundle, Device::Cpu, Kind::QInt8).unwrap();
    let f32 = Bundle::load(bundle, Device::Cpu, Kind::Float).unwrap();
    assert!(int8.encoder.int8.is_some() && f32.encoder.int8.is_none());
    let (a, b) = (
        int8.encoder.encode(pixels).unwrap(),
        f32.encoder.encode(pixels).unwrap(),
    );
    let cos = Tensor::cosine_similarity(&a, &b, 1, 1e-8)
        .min()
        .double_value(&[]);
    assert!(
        cos >= 0.99 && !a.equal(&b),
        "int8 embeddings' cosine to f32's: {cos}"
    );
    (int8, f32, b)
}
