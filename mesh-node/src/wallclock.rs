//! The node's wall-clock time, for what certificates need (validity, expiry, renewal): devices
//! often boot without a real-time clock, and a clock in 1970 would refuse every certificate,
//! while a clock set back would trust expired ones.
//!
//! The node does not believe a system clock earlier than
//! - its time floor: the last time it saved (`time.floor` in its state folder, at start, every
//!   ten minutes and at shutdown), in the run that saved it as in the next, and
//! - its own certificate's notBefore (the certificate was issued after it).
//!
//! When the system clock is before either, the clock is obviously wrong. The node then runs from
//! the floor (floor, plus the monotonic time since it was set) if it has one, and takes the time
//! from its gateway as soon as a control stream gives it (`Down::Time`, sent when a stream
//! opens, on a connection whose certificate it verified; the round trip must be short). A clock
//! stepped back while the stream is up opens a new stream for it. From then on the node runs on
//! the gateway's time plus its monotonic clock, whatever the system clock does. The gateway's
//! time may be before the floor: a floor saved while the clock ran ahead is lowered to it (see
//! [`adopt_gateway_time`]). With neither floor nor gateway, the node dates nothing: every peer
//! but a certified gateway is refused with a clear error, and a gateway's certificate is checked
//! as of its own notBefore, so that the node can learn the time from it. What this trusts: a
//! gateway's certificate, even one that expired, can set the clock of a node that has no other
//! source; a gateway's certificate valid at the floor can set the clock back past the floor.
//!
//! One clock per process (the node's). In tests that run many nodes in one process the system
//! clock is right and the floor never applies.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where the time came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// The system clock, which is not before the floor.
    System,
    /// The system clock is wrong: the floor plus the time since start.
    Floor,
    /// The system clock is wrong: corrected by the gateway's time.
    Gateway,
    /// The system clock is wrong and there is no floor: nothing is dated (a gateway only).
    Unknown,
}

impl Basis {
    /// `system`, `floor`, `gateway`, `unknown`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Basis::System => "system",
            Basis::Floor => "floor",
            Basis::Gateway => "gateway",
            Basis::Unknown => "unknown",
        }
    }
}

/// How long a node whose clock is wrong waits before it asks its gateway for the time again.
const ASK_AGAIN: Duration = Duration::from_secs(30);

struct Clock {
    /// Unix seconds of the saved floor (0: none): raised when it is saved, lowered only by the
    /// gateway's time.
    floor: AtomicU64,
    /// The floor as Unix milliseconds at [`epoch`]: when the node runs on its floor, the floor
    /// plus the monotonic time since it was set.
    floor_base_ms: AtomicU64,
    /// Unix seconds of the node's own certificate's notBefore (0: none).
    not_before: AtomicU64,
    /// The gateway's time, as Unix milliseconds at [`epoch`] (0: none): the node runs on it,
    /// plus the monotonic time since, so that a later step of the system clock does not move it.
    gateway_base_ms: AtomicU64,
    /// When the gateway last gave the time (milliseconds after [`epoch`], plus one; 0: never).
    offered_ms: AtomicU64,
    /// The floor file.
    path: Mutex<Option<PathBuf>>,
}

static CLOCK: Clock = Clock {
    floor: AtomicU64::new(0),
    floor_base_ms: AtomicU64::new(0),
    not_before: AtomicU64::new(0),
    gateway_base_ms: AtomicU64::new(0),
    offered_ms: AtomicU64::new(0),
    path: Mutex::new(None),
};

/// The monotonic start of this process's clock: the floor runs from there.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn elapsed() -> Duration {
    epoch().elapsed()
}

fn elapsed_ms() -> u64 {
    elapsed().as_millis() as u64
}

/// Sets the floor to `secs`, as of now.
fn set_floor(secs: u64) {
    CLOCK.floor.store(secs, Ordering::Relaxed);
    CLOCK.floor_base_ms.store(
        secs.saturating_mul(1000).saturating_sub(elapsed_ms()),
        Ordering::Relaxed,
    );
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Reads the floor in `state_dir` and notes the node's certificate's `not_before`. A floor file
/// that does not read is an error: the node does not start on a clock it cannot bound.
pub(crate) fn init(state_dir: &Path, not_before: SystemTime) -> Result<Basis, String> {
    let path = state_dir.join("time.floor");
    let floor = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().map_err(|_| {
            format!(
                "{}: the time floor is damaged ({:?}); remove it only if this device's clock is \
                 right",
                path.display(),
                text.chars().take(40).collect::<String>()
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    if floor > CLOCK.floor.load(Ordering::Relaxed) {
        set_floor(floor);
    }
    CLOCK
        .not_before
        .fetch_max(secs(not_before), Ordering::Relaxed);
    epoch();
    *CLOCK.path.lock().unwrap_or_else(|p| p.into_inner()) = Some(path);
    Ok(now().1)
}

/// Now, and where it came from.
pub fn now() -> (SystemTime, Basis) {
    let base = CLOCK.gateway_base_ms.load(Ordering::Relaxed);
    if base != 0 {
        return (
            UNIX_EPOCH + Duration::from_millis(base) + elapsed(),
            Basis::Gateway,
        );
    }
    let system = SystemTime::now();
    let floor = CLOCK.floor.load(Ordering::Relaxed);
    let lower = floor.max(CLOCK.not_before.load(Ordering::Relaxed));
    if secs(system) >= lower {
        return (system, Basis::System);
    }
    let from_not_before = CLOCK
        .not_before
        .load(Ordering::Relaxed)
        .saturating_mul(1000)
        .saturating_add(elapsed_ms());
    if floor > 0 {
        let from_floor = CLOCK
            .floor_base_ms
            .load(Ordering::Relaxed)
            .saturating_add(elapsed_ms());
        return (
            UNIX_EPOCH + Duration::from_millis(from_floor.max(from_not_before)),
            Basis::Floor,
        );
    }
    (
        UNIX_EPOCH + Duration::from_millis(from_not_before),
        Basis::Unknown,
    )
}

/// Now, as certificates are checked.
pub fn time() -> SystemTime {
    now().0
}

/// Whether the control stream should be opened again for the gateway's time: this node's
/// system clock is wrong (before its floor or its certificate's issue; it may have been stepped
/// back while the stream was up, and the gateway gives the time when a stream opens), and the
/// gateway has not given it in the last [`ASK_AGAIN`].
pub(crate) fn wants_gateway_time() -> bool {
    if !matches!(now().1, Basis::Floor | Basis::Unknown) {
        return false;
    }
    let offered = CLOCK.offered_ms.load(Ordering::Relaxed);
    offered == 0 || elapsed().saturating_sub(Duration::from_millis(offered - 1)) >= ASK_AGAIN
}

/// Takes the gateway's time (`unix_ms`, read `rtt` after asking) when the system clock is
/// wrong; says what it did.
///
/// The gateway's time is believed even when it is before the time floor: the floor is only as
/// good as the clock that saved it, and a clock that ran ahead (a bad real-time clock, a wrong
/// NTP answer) would otherwise leave a floor that dates every certificate as expired until the
/// true time catches up. The gateway is the site's authority: its certificate was checked as of
/// the floor, and the time comes fresh over that session (a round trip of at most 2 s). The
/// floor is then lowered to it. It must still not be before this node's own certificate was
/// issued.
pub(crate) fn adopt_gateway_time(unix_ms: u64, rtt: Duration) -> Option<String> {
    let (_, basis) = now();
    if basis == Basis::System {
        return None;
    }
    CLOCK
        .offered_ms
        .store(elapsed_ms().saturating_add(1), Ordering::Relaxed);
    if rtt > Duration::from_secs(2) {
        return Some(format!(
            "did not take the gateway's time: it came {} ms after the hello (at most 2000)",
            rtt.as_millis()
        ));
    }
    let gateway = unix_ms.saturating_add(rtt.as_millis() as u64 / 2);
    let not_before_ms = CLOCK
        .not_before
        .load(Ordering::Relaxed)
        .saturating_mul(1000);
    if gateway < not_before_ms {
        return Some(format!(
            "did not take the gateway's time {gateway} ms: it is before this node's certificate \
             was issued ({not_before_ms} ms)"
        ));
    }
    CLOCK.gateway_base_ms.store(
        gateway.saturating_sub(elapsed_ms()).max(1),
        Ordering::Relaxed,
    );
    let floor_ms = CLOCK.floor.load(Ordering::Relaxed).saturating_mul(1000);
    let lowered = gateway < floor_ms;
    if lowered {
        set_floor(gateway / 1000);
    }
    save_floor();
    match (basis, lowered) {
        (_, true) => Some(format!(
            "this node's time floor was {} s ahead of its gateway's time (its clock ran ahead \
             when the floor was saved): the floor is lowered, and the node runs on its \
             gateway's time",
            (floor_ms - gateway) / 1000
        )),
        // A new stream's time, taken again: nothing to say.
        (Basis::Gateway, false) => None,
        (basis, false) => Some(format!(
            "this node's clock was wrong ({}): it now runs on its gateway's time",
            basis.as_str()
        )),
    }
}

/// Saves the floor (now), unless the time is unknown. Blocking (fsync): at most every few
/// minutes.
pub(crate) fn save_floor() {
    let (t, basis) = now();
    if basis == Basis::Unknown {
        return;
    }
    let path = CLOCK.path.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(path) = path else { return };
    let s = secs(t);
    if s > CLOCK.floor.load(Ordering::Relaxed) {
        set_floor(s);
    }
    if let Err(e) = crate::state::write_atomic(&path, format!("{s}\n").as_bytes(), 0o600) {
        tracing::warn!("cannot save the time floor: {}: {e}", path.display());
    }
}

/// rustls's clock: the node's.
#[derive(Debug)]
pub(crate) struct MeshTime;

impl rustls::time_provider::TimeProvider for MeshTime {
    fn current_time(&self) -> Option<rustls_pki_types::UnixTime> {
        Some(rustls_pki_types::UnixTime::since_unix_epoch(
            time().duration_since(UNIX_EPOCH).unwrap_or_default(),
        ))
    }
}
