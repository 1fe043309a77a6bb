//! firmware-shim on QEMU's mps2-an386 (Cortex-M4): the mesh calls `sensor/read`, `sensor/info`
//! and `actuator/set` on this "microcontroller" through the node its UART0 is wired to.
//!
//! The UART is the CMSDK APB UART of the MPS2 boards, driven by hand (a few registers); time is
//! SysTick at 1 kHz from the 25 MHz system clock.
#![no_std]
#![no_main]
// The `bare` build (the size baseline) keeps the handlers but not the shim that calls them.
#![cfg_attr(feature = "bare", allow(dead_code, unused_imports))]

use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::{entry, exception};
use firmware_shim::{Config, Method, Service, Shim};
use mesh_proto::Status;
use panic_halt as _;

/// The CMSDK APB UART0 of the MPS2 boards.
struct Uart {
    base: usize,
}

const DATA: usize = 0x0;
const STATE: usize = 0x4;
const CTRL: usize = 0x8;
const BAUDDIV: usize = 0x10;
const TX_FULL: u32 = 1;
const RX_FULL: u32 = 2;

impl Uart {
    fn new(base: usize) -> Uart {
        let uart = Uart { base };
        // 25 MHz / 115200; transmitter and receiver on.
        uart.write_reg(BAUDDIV, 217);
        uart.write_reg(CTRL, 0b11);
        uart
    }

    fn read_reg(&self, offset: usize) -> u32 {
        // SAFETY: a device register of the board's memory map, read as a u32.
        unsafe { core::ptr::read_volatile((self.base + offset) as *const u32) }
    }

    fn write_reg(&self, offset: usize, value: u32) {
        // SAFETY: a device register of the board's memory map, written as a u32.
        unsafe { core::ptr::write_volatile((self.base + offset) as *mut u32, value) }
    }
}

impl embedded_io::ErrorType for Uart {
    type Error = core::convert::Infallible;
}

impl embedded_io::ReadReady for Uart {
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        Ok(self.read_reg(STATE) & RX_FULL != 0)
    }
}

impl embedded_io::Read for Uart {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let mut n = 0;
        while n < buf.len() && self.read_reg(STATE) & RX_FULL != 0 {
            buf[n] = self.read_reg(DATA) as u8;
            n += 1;
        }
        Ok(n)
    }
}

impl embedded_io::Write for Uart {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        for &b in buf {
            while self.read_reg(STATE) & TX_FULL != 0 {}
            self.write_reg(DATA, u32::from(b));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

static MILLIS: AtomicU32 = AtomicU32::new(0);

#[exception]
fn SysTick() {
    MILLIS.fetch_add(1, Ordering::Relaxed);
}

/// A temperature, in tenths of a degree, from a made-up sensor that warms by a tenth per read.
static READS: AtomicU32 = AtomicU32::new(0);

fn read(_body: &[u8], out: &mut [u8]) -> Result<usize, Status> {
    let tenths = 215 + READS.fetch_add(1, Ordering::Relaxed) % 10;
    let text = [
        b'0' + (tenths / 100) as u8,
        b'0' + (tenths / 10 % 10) as u8,
        b'.',
        b'0' + (tenths % 10) as u8,
    ];
    out[..4].copy_from_slice(&text);
    Ok(4)
}

fn info(_body: &[u8], out: &mut [u8]) -> Result<usize, Status> {
    let text = b"qemu-mps2 cortex-m4 0.1.0";
    out[..text.len()].copy_from_slice(text);
    Ok(text.len())
}

static LEVEL: AtomicU32 = AtomicU32::new(0);

/// Sets the actuator to the number in the body (0-100), answers the level now.
fn set(body: &[u8], out: &mut [u8]) -> Result<usize, Status> {
    let mut level: u32 = 0;
    if body.is_empty() || body.len() > 3 {
        return Err(Status::InvalidArgument);
    }
    for &b in body {
        if !b.is_ascii_digit() {
            return Err(Status::InvalidArgument);
        }
        level = level * 10 + u32::from(b - b'0');
    }
    if level > 100 {
        return Err(Status::InvalidArgument);
    }
    LEVEL.store(level, Ordering::Relaxed);
    out[..body.len()].copy_from_slice(body);
    Ok(body.len())
}

static SERVICES: &[Service] = &[
    Service {
        name: "sensor",
        methods: &[
            Method {
                name: "read",
                handler: read,
            },
            Method {
                name: "info",
                handler: info,
            },
        ],
    },
    Service {
        name: "actuator",
        methods: &[Method {
            name: "set",
            handler: set,
        }],
    },
];

#[cfg(not(feature = "bare"))]
static mut SHIM: Shim<256, 64> = Shim::new(Config {
    name: "qemu-mcu",
    firmware: "0.1.0",
    services: SERVICES,
    heartbeat_ms: 200,
    key: None,
});

#[entry]
fn main() -> ! {
    let mut core = cortex_m::Peripherals::take().unwrap_or_else(|| loop {});
    core.SYST.set_clock_source(SystClkSource::Core);
    core.SYST.set_reload(25_000 - 1);
    core.SYST.clear_current();
    core.SYST.enable_counter();
    core.SYST.enable_interrupt();
    let mut uart = Uart::new(0x4000_4000);
    #[cfg(feature = "bare")]
    loop {
        use embedded_io::{Read, Write};
        let mut buf = [0u8; 32];
        let Ok(n) = uart.read(&mut buf);
        let Ok(()) = uart.write_all(&buf[..n]);
    }
    #[cfg(not(feature = "bare"))]
    {
        // SAFETY: the only reference to the shim, taken once here; nothing else touches it.
        let shim = unsafe { &mut *core::ptr::addr_of_mut!(SHIM) };
        loop {
            let _ = shim.pump(&mut uart, MILLIS.load(Ordering::Relaxed));
        }
    }
}
