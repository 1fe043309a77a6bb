//! The node's wall-clock time, for what certificates need (validity, expiry, renewal): devices
//! often boot without a real-time clock, and a clock in 1970 would refuse every certificate,
//! while a clock set back would trust expired ones.
//!
//! The node never believes a time earlier than
//! - its time floor: the last time it saved (`time.floor` in its state folder, every ten minutes
//!   and at shutdown), and
//! - its own certificate's notBefore (the certificate was issued after it).
//!
//! When the system clock is before either, the clock is obviously wrong. The node then runs from
//! the floor (floor, plus the time elapsed since it started) if it has one, and takes the time
//! from its gateway as soon as the control stream gives it (`Down::Time`, on a connection whose
//! certificate it verified; the round trip must be short and the time not earlier than the
//! floor). With neither, it dates nothing: every peer but a certified gateway is refused with a
//! clear error, and a gateway's certificate is checked as of its own notBefore, so that the node
//! can learn the time from it. What this trusts: a gateway's certificate, even one that expired,
//! can set the clock of a node that has no other source.
//!
//! One clock per process (the node's). In tests that run many nodes in one process the system
//! clock is right and the floor never applies.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
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

/// No gateway correction.
const NO_OFFSET: i64 = i64::MIN;

struct Clock {
    /// Unix seconds of the saved floor (0: none).
    floor: AtomicU64,
    /// Unix seconds of the node's own certificate's notBefore (0: none).
    not_before: AtomicU64,
    /// Milliseconds added to the system clock, from the gateway.
    offset_ms: AtomicI64,
    /// When the node started: the floor runs from there.
    started: Mutex<Option<Instant>>,
    /// The floor file.
    path: Mutex<Option<PathBuf>>,
}

static CLOCK: Clock = Clock {
    floor: AtomicU64::new(0),
    not_before: AtomicU64::new(0),
    offset_ms: AtomicI64::new(NO_OFFSET),
    started: Mutex::new(None),
    path: Mutex::new(None),
};

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn elapsed() -> Duration {
    CLOCK
        .started
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .map_or(Duration::ZERO, |s| s.elapsed())
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
    CLOCK.floor.fetch_max(floor, Ordering::Relaxed);
    CLOCK
        .not_before
        .fetch_max(secs(not_before), Ordering::Relaxed);
    CLOCK
        .started
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(Instant::now);
    *CLOCK.path.lock().unwrap_or_else(|p| p.into_inner()) = Some(path);
    Ok(now().1)
}

/// Now, and where it came from.
pub fn now() -> (SystemTime, Basis) {
    let system = SystemTime::now();
    let floor = CLOCK.floor.load(Ordering::Relaxed);
    let lower = floor.max(CLOCK.not_before.load(Ordering::Relaxed));
    let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
    let offset = CLOCK.offset_ms.load(Ordering::Relaxed);
    if offset != NO_OFFSET {
        let corrected = if offset >= 0 {
            system + Duration::from_millis(offset as u64)
        } else {
            system
                .checked_sub(Duration::from_millis(offset.unsigned_abs()))
                .unwrap_or(UNIX_EPOCH)
        };
        return (corrected.max(at(floor)), Basis::Gateway);
    }
    if secs(system) >= lower {
        return (system, Basis::System);
    }
    if floor > 0 {
        return (at(lower) + elapsed(), Basis::Floor);
    }
    (at(lower) + elapsed(), Basis::Unknown)
}

/// Now, as certificates are checked.
pub fn time() -> SystemTime {
    now().0
}

/// Takes the gateway's time (`unix_ms`, read `rtt` after asking) when the system clock is
/// wrong; says what it did.
pub(crate) fn adopt_gateway_time(unix_ms: u64, rtt: Duration) -> Option<String> {
    let (_, basis) = now();
    if basis == Basis::System || basis == Basis::Gateway {
        return None;
    }
    if rtt > Duration::from_secs(2) {
        return Some(format!(
            "did not take the gateway's time: it came {} ms after the hello (at most 2000)",
            rtt.as_millis()
        ));
    }
    let gateway = unix_ms.saturating_add(rtt.as_millis() as u64 / 2);
    let floor_ms = CLOCK.floor.load(Ordering::Relaxed).saturating_mul(1000);
    if gateway < floor_ms {
        return Some(format!(
            "did not take the gateway's time {gateway} ms: it is before this node's time floor \
             {floor_ms} ms"
        ));
    }
    let system = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    CLOCK
        .offset_ms
        .store((gateway as i64).saturating_sub(system), Ordering::Relaxed);
    save_floor();
    Some(format!(
        "this node's clock was wrong ({basis:?}): it now runs on its gateway's time",
        basis = basis
    ))
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
