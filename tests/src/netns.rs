//! Network namespaces for end-to-end tests: a guard that deletes the namespace on drop
//! (also when the test panics), commands with a bounded run time, and running code with
//! the calling thread inside a namespace.
//!
//! Names are unique per process ([`unique_name`]), so concurrent test binaries do not
//! collide. Everything here shells out to `ip` (iproute2); entering a namespace uses
//! `setns(2)` through rustix on a dedicated thread, so the test's own threads never
//! change namespace.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Default bound for one helper command (`ip`, `nft`, `conntrack`, `sysctl`).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// A failed helper command.
#[derive(Debug)]
pub struct CommandError {
    /// The command line.
    pub command: String,
    /// What went wrong (exit status and stderr, spawn error, or timeout).
    pub problem: String,
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.command, self.problem)
    }
}

impl std::error::Error for CommandError {}

/// Run `program args` with a time bound; returns stdout, or an error with stderr.
///
/// # Errors
/// Spawn failure, non-zero exit, or the bound passed (the child is killed).
pub fn run_bounded(
    program: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<String, CommandError> {
    let command = format!("{program} {}", args.join(" "));
    let err = |problem: String| CommandError {
        command: command.clone(),
        problem,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("cannot start: {e}")))?;
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take();
    let mut errp = child.stderr.take();
    let out_t = thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let err_t = thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = errp.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err(format!("timed out after {timeout:?}")));
            }
            Ok(None) => thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(err(format!("wait failed: {e}"))),
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        Err(err(format!("{status}: {}", stderr.trim())))
    }
}

/// `which`-like check that `program` is on `PATH`.
#[must_use]
pub fn have_program(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Whether the process runs with effective uid 0.
#[must_use]
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

/// Why end-to-end network tests cannot run here, if they cannot: not root, or one of
/// `programs` missing.
#[must_use]
pub fn skip_reason(programs: &[&str]) -> Option<String> {
    if !is_root() {
        return Some("not running as root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|p| !have_program(p))
        .collect();
    if !missing.is_empty() {
        return Some(format!("missing programs: {}", missing.join(", ")));
    }
    None
}

/// A name unique to this process and `tag` (at most 15 bytes for short tags, so it can
/// also name an interface).
#[must_use]
pub fn unique_name(tag: &str) -> String {
    format!("ct{}{tag}", std::process::id())
}

/// A network namespace that exists as long as this value (`ip netns add` / `del`).
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Create the namespace `name`.
    ///
    /// # Errors
    /// `ip netns add` failed (e.g. the name exists, or no privilege).
    pub fn new(name: &str) -> Result<Self, CommandError> {
        // A leftover from a killed run of the same pid would make `add` fail.
        let _ = run_bounded("ip", &["netns", "del", name], COMMAND_TIMEOUT);
        run_bounded("ip", &["netns", "add", name], COMMAND_TIMEOUT)?;
        Ok(Self { name: name.into() })
    }

    /// The namespace's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Run `program args` inside the namespace (`ip netns exec`), bounded.
    ///
    /// # Errors
    /// See [`run_bounded`].
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, CommandError> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        run_bounded("ip", &full, COMMAND_TIMEOUT)
    }

    /// Run `ip -n <ns> args`.
    ///
    /// # Errors
    /// See [`run_bounded`].
    pub fn ip(&self, args: &[&str]) -> Result<String, CommandError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_bounded("ip", &full, COMMAND_TIMEOUT)
    }

    /// Load an nftables ruleset (`nft -f`, from a temporary file) inside the namespace.
    ///
    /// # Errors
    /// The file cannot be written, or `nft` refused the rules.
    pub fn nft(&self, rules: &str) -> Result<(), CommandError> {
        let path = std::env::temp_dir().join(format!("{}.nft", unique_name(&self.name)));
        std::fs::write(&path, rules).map_err(|e| CommandError {
            command: format!("write {}", path.display()),
            problem: e.to_string(),
        })?;
        let loaded = self.exec("nft", &["-f", &path.to_string_lossy()]);
        let _ = std::fs::remove_file(&path);
        loaded.map(|_| ())
    }

    /// Set sysctls inside the namespace (`key=value` each, dotted keys), by writing
    /// `/proc/sys` from a thread inside it (no `sysctl` program needed).
    ///
    /// # Errors
    /// A key that does not exist in the namespace, or a refused value.
    pub fn sysctl(&self, settings: &[&str]) -> Result<(), CommandError> {
        let owned: Vec<String> = settings.iter().map(|s| (*s).to_owned()).collect();
        let res = self.run_inside(move || -> Result<(), (String, String)> {
            for s in &owned {
                let (k, v) = s.split_once('=').ok_or((s.clone(), "no `=`".to_owned()))?;
                let path = format!("/proc/sys/{}", k.replace('.', "/"));
                std::fs::write(&path, v).map_err(|e| (s.clone(), e.to_string()))?;
            }
            Ok(())
        });
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err((setting, problem))) => Err(CommandError {
                command: format!("sysctl -w {setting} (in {})", self.name),
                problem,
            }),
            Err(e) => Err(CommandError {
                command: format!("setns {}", self.name),
                problem: e.to_string(),
            }),
        }
    }

    /// Run `f` on a new thread that has entered this namespace, and return its result.
    /// Sockets `f` creates belong to the namespace and stay there after the thread ends.
    ///
    /// # Errors
    /// The namespace file cannot be opened or entered.
    pub fn run_inside<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        let ns = File::open(&path)?;
        let handle = thread::spawn(move || -> std::io::Result<T> {
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            Ok(f())
        });
        handle
            .join()
            .map_err(|_| std::io::Error::other("namespace thread panicked"))?
    }
}

impl NetNs {
    /// Start `f` on a new thread that has entered this namespace and return its handle
    /// (for long-running work, such as a forwarding loop, that the caller stops and
    /// joins). The thread's result is an error if it could not enter the namespace.
    ///
    /// # Errors
    /// The namespace file cannot be opened.
    pub fn spawn_inside<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<thread::JoinHandle<std::io::Result<T>>> {
        let path = format!("/var/run/netns/{}", self.name);
        let ns = File::open(&path)?;
        Ok(thread::spawn(move || -> std::io::Result<T> {
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            Ok(f())
        }))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veths in it (and so their peers).
        if let Err(e) = run_bounded("ip", &["netns", "del", &self.name], COMMAND_TIMEOUT) {
            eprintln!(
                "warning: cannot delete network namespace {}: {e}",
                self.name
            );
        }
    }
}
