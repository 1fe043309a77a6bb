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
//! stepped back while the stream is up opens a new stream for it (asked again after 30 s,
//! doubling up to 10 minutes, while the time is refused). From then on the node runs on the
//! gateway's time plus its monotonic clock, or on its system clock when that is not behind it
//! (the monotonic clock stops while a device sleeps; the later time never trusts an expired
//! certificate). The gateway's time may be before the floor: a floor saved while the clock ran
//! ahead is lowered to it (see
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
    /// The system clock, which is not before the floor (nor, once the node has its gateway's
    /// time, before that).
    System,
    /// The system clock is wrong: the floor plus the monotonic time since it was set.
    Floor,
    /// The system clock is behind: the gateway's time plus the monotonic time since it came.
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

/// How long a node whose clock is wrong waits before it asks its gateway for the time again;
/// doubled at every ask that did not set its clock, up to [`ASK_AGAIN_MAX`].
const ASK_AGAIN: Duration = Duration::from_secs(30);
const ASK_AGAIN_MAX: Duration = Duration::from_secs(600);

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
    /// When the gateway last gave the time while the clock was wrong, or the node last asked
    /// for it (milliseconds after [`epoch`], plus one; 0: never).
    asked_ms: AtomicU64,
    /// Asks since the node last took its gateway's time.
    asks: AtomicU64,
    /// The floor file; its lock orders the floor's updates and writes.
    path: Mutex<Option<PathBuf>>,
}

static CLOCK: Clock = Clock {
    floor: AtomicU64::new(0),
    floor_base_ms: AtomicU64::new(0),
    not_before: AtomicU64::new(0),
    gateway_base_ms: AtomicU64::new(0),
    asked_ms: AtomicU64::new(0),
    asks: AtomicU64::new(0),
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

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Sets the floor to `ms` (Unix milliseconds), as of now. Under the floor file's lock (or at
/// start).
fn set_floor_ms(ms: u64) {
    CLOCK.floor.store(ms / 1000, Ordering::Relaxed);
    CLOCK
        .floor_base_ms
        .store(ms.saturating_sub(elapsed_ms()), Ordering::Relaxed);
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
        set_floor_ms(floor.saturating_mul(1000));
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
    let system = SystemTime::now();
    let base = CLOCK.gateway_base_ms.load(Ordering::Relaxed);
    if base != 0 {
        // The later of the two: the monotonic clock stops while the device is suspended, and
        // the later time never takes an expired certificate for a valid one.
        let gateway = UNIX_EPOCH + Duration::from_millis(base) + elapsed();
        return if system >= gateway {
            (system, Basis::System)
        } else {
            (gateway, Basis::Gateway)
        };
    }
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
/// back while the stream was up, and the gateway gives the time when a stream opens), and it
/// has not been given or asked for it lately: 30 s, doubled at every ask that did not set the
/// clock (a refused time, or none at all), up to 10 minutes. Says yes once per wait: the caller
/// asks.
pub(crate) fn wants_gateway_time() -> bool {
    if !matches!(now().1, Basis::Floor | Basis::Unknown) {
        return false;
    }
    let asks = CLOCK.asks.load(Ordering::Relaxed).min(5) as u32;
    let wait = ASK_AGAIN.saturating_mul(1 << asks).min(ASK_AGAIN_MAX);
    let last = CLOCK.asked_ms.load(Ordering::Relaxed);
    if last != 0 && elapsed().saturating_sub(Duration::from_millis(last - 1)) < wait {
        return false;
    }
    CLOCK
        .asked_ms
        .store(elapsed_ms().saturating_add(1), Ordering::Relaxed);
    CLOCK.asks.fetch_add(1, Ordering::Relaxed);
    true
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
        .asked_ms
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
    let path = CLOCK.path.lock().unwrap_or_else(|p| p.into_inner());
    CLOCK.gateway_base_ms.store(
        gateway.saturating_sub(elapsed_ms()).max(1),
        Ordering::Relaxed,
    );
    CLOCK.asks.store(0, Ordering::Relaxed);
    let floor_ms = CLOCK.floor.load(Ordering::Relaxed).saturating_mul(1000);
    let lowered = gateway < floor_ms;
    if lowered {
        set_floor_ms(gateway);
    }
    save_floor_locked(&path);
    drop(path);
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

/// Saves the floor (now), unless the time is unknown, and raises the floor in memory to it.
/// Blocking (fsync): at most every few minutes.
pub(crate) fn save_floor() {
    let path = CLOCK.path.lock().unwrap_or_else(|p| p.into_inner());
    save_floor_locked(&path);
}

fn save_floor_locked(path: &Option<PathBuf>) {
    let (t, basis) = now();
    if basis == Basis::Unknown {
        return;
    }
    let Some(path) = path else { return };
    let ms = unix_ms(t);
    if ms / 1000 > CLOCK.floor.load(Ordering::Relaxed) {
        set_floor_ms(ms);
    }
    if let Err(e) = crate::state::write_atomic(path, format!("{}\n", ms / 1000).as_bytes(), 0o600) {
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
