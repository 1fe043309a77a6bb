//! What both binaries' `main` needs: the runtime (one thread, as on a device), the log subscriber,
//! and waiting for a signal.

/// The node's runtime: one thread, as on a device.
pub fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1)
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Plain text, one event a line: with a timestamp on a terminal or in a file, without one
    /// under systemd (journald stamps every line itself), never with colour codes outside a
    /// terminal.
    #[default]
    Text,
    /// One JSON object a line, with stable keys: `timestamp` (RFC 3339, UTC), `level`, `fields`
    /// (`message` and the event's own fields), and `spans` when inside one.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("{s:?}: the log format is \"text\" or \"json\"")),
        }
    }
}

/// The log filter `text` names: a default level and levels by module, comma-separated
/// (`"info"`, `"info,quinn=warn,mesh_node::server=debug"`), as `RUST_LOG` takes them. A module
/// is always given its level: a bare word that is not a level (`"warning"`) is refused, where
/// `RUST_LOG` would read it as a module and log nothing else. Spans and fields are not filtered
/// on (a filter that names them is refused): the regular expressions those need cost the aarch64
/// binary 259 KB of its 4 MB budget.
pub fn log_filter(text: &str) -> Result<tracing_subscriber::filter::Targets, String> {
    const FORM: &str =
        "a level (trace, debug, info, warn, error, off) or module=level, comma-separated";
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let level = |l: &str| l.parse::<tracing_subscriber::filter::LevelFilter>().is_ok();
    // A module path, not a span or field filter (`Targets` would read one as a module name).
    let module = |m: &str| {
        !m.is_empty()
            && m.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'))
    };
    // `LevelFilter` reads "" as `error`: an empty part is refused here.
    if let Some(bad) = parts.iter().find(|p| match p.split_once('=') {
        _ if p.is_empty() => true,
        None => !level(p),
        Some((m, l)) => l.is_empty() || !module(m) || !level(l),
    }) {
        return Err(format!("{text:?}: {bad:?} is not {FORM}"));
    }
    parts
        .join(",")
        .parse()
        .map_err(|e| format!("{text:?}: {e} ({FORM})"))
}

/// Installs the log subscriber: `RUST_LOG` if set and valid (an invalid one is logged and
/// ignored; one that is not UTF-8 is taken as unset), else `filter` (checked with the config);
/// logs go to stderr in `format`.
pub fn init_logging(filter: &str, format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (from_env, ignored) = match std::env::var("RUST_LOG").map(|env| log_filter(&env)) {
        Ok(Ok(targets)) => (Some(targets), None),
        Ok(Err(e)) => (None, Some(e)),
        Err(_) => (None, None),
    };
    let targets = from_env
        .or_else(|| log_filter(filter).ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
        });
    // The most verbose level the filter lets through: below it, a disabled event (and a `log`
    // record from rustls) is refused at its first check.
    let most = tracing_subscriber::Layer::<tracing_subscriber::Registry>::max_level_hint(&targets)
        .unwrap_or(tracing_subscriber::filter::LevelFilter::TRACE);
    let builder = tracing_subscriber::fmt()
        .with_max_level(most)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().finish().with(targets).try_init(),
        LogFormat::Text => {
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
            // systemd sets JOURNAL_STREAM for a service whose output goes to the journal.
            let journald = std::env::var_os("JOURNAL_STREAM").is_some();
            let builder = builder.with_ansi(terminal);
            if journald && !terminal {
                builder.without_time().finish().with(targets).try_init()
            } else {
                builder.finish().with(targets).try_init()
            }
        }
    };
    // An error, so that a filter of errors only still shows it.
    if let Some(e) = ignored {
        tracing::error!("RUST_LOG ignored: {e}");
    }
}

/// Tells the service manager `state` (`READY=1`, `WATCHDOG=1`, `STOPPING=1`) over systemd's
/// notification protocol, when it asked for it (`NOTIFY_SOCKET`); false when not asked or the
/// message could not be sent.
pub fn notify(state: &str) -> bool {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    send_notification(&socket, state).is_ok()
}

#[cfg(target_os = "linux")]
fn send_notification(socket: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let sock = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    // A name starting with '@' is in the abstract namespace.
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(std::path::Path::new(socket))?,
    };
    sock.send_to_addr(state.as_bytes(), &addr).map(|_| ())
}

#[cfg(not(target_os = "linux"))]
fn send_notification(_socket: &std::ffi::OsStr, _state: &str) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Says `READY=1` and, when the service manager watches this process (`WATCHDOG_USEC`, for this
/// pid), says `WATCHDOG=1` every half of its interval from the runtime's own thread: a runtime that
/// hangs stops the pings, and systemd restarts the node.
pub fn notify_ready_and_watch() {
    if !notify("READY=1") {
        return;
    }
    let for_us = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_none_or(|pid| pid == std::process::id());
    let Some(usec) = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|u| u.parse::<u64>().ok())
        .filter(|u| *u > 0 && for_us)
    else {
        return;
    };
    let every = std::time::Duration::from_micros(usec / 2).max(std::time::Duration::from_millis(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            notify("WATCHDOG=1");
        }
    });
}

/// `s` with control characters shown as `?`: words from a peer or a node on an operator's
/// terminal.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Listens for SIGTERM and SIGINT (Ctrl-C) from the call on; the future ends at the first.
/// Called before a node starts: a stop asked as soon as the node says it listens (its lock
/// file, its readiness) is not lost to the default action, which would end the process without
/// its shutdown. Called within the runtime.
#[cfg(unix)]
pub fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (term, int) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Ok(mut one), Err(_)) | (Err(_), Ok(mut one)) => {
                one.recv().await;
            }
            // Neither could be listened for: their default action ends the process.
            (Err(_), Err(_)) => std::future::pending().await,
        }
    }
}

/// Ctrl-C, where there are no Unix signals.
#[cfg(not(unix))]
pub fn stop_signal() -> impl std::future::Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
