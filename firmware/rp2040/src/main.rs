//! firmware-shim on a Raspberry Pi Pico (RP2040) with embassy: the mesh calls `sensor/read`,
//! `sensor/info` and `led/set` through the node whose serial line is wired to UART0.
//!
//! Wiring: Pico GP0 (UART0 TX) to the adapter's RX, GP1 (UART0 RX) to its TX, GND to GND; the
//! node names the adapter: `upstream = "serial:///dev/ttyUSB0?baud=115200"`.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, Ordering};

use embassy_executor::Spawner;
use embassy_rp::bind_interrupts;
use embassy_rp::peripherals::UART0;
use embassy_rp::uart::{BufferedInterruptHandler, BufferedUart, Config as UartConfig};
use embassy_time::{Instant, Timer};
use firmware_shim::{Config, Method, Service, Shim};
use mesh_proto::Status;
use panic_halt as _;

bind_interrupts!(struct Irqs {
    UART0_IRQ => BufferedInterruptHandler<UART0>;
});

/// The last level `led/set` asked for (0 off, anything else on); the main loop applies it.
static LED: AtomicU32 = AtomicU32::new(0);

fn read(_body: &[u8], out: &mut [u8]) -> Result<usize, Status> {
    // A made-up reading: a real board would read its ADC here (handlers are plain functions).
    let text = b"21.5";
    out[..text.len()].copy_from_slice(text);
    Ok(text.len())
}

fn info(_body: &[u8], out: &mut [u8]) -> Result<usize, Status> {
    let text = b"rp2040 pico 0.1.0";
    out[..text.len()].copy_from_slice(text);
    Ok(text.len())
}

fn set(body: &[u8], out: &mut [u8]) -> Result<usize, Status> {
    let on = match body {
        b"on" | b"1" => 1,
        b"off" | b"0" => 0,
        _ => return Err(Status::InvalidArgument),
    };
    LED.store(on, Ordering::Relaxed);
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
        name: "led",
        methods: &[Method {
            name: "set",
            handler: set,
        }],
    },
];

#[embassy_executor::main]
async fn main(_spawner: Spawner) {
    let p = embassy_rp::init(Default::default());
    let mut config = UartConfig::default();
    config.baudrate = 115_200;
    // Interrupt-driven, buffered: bytes are kept while the loop is busy with a call.
    let (mut tx_buf, mut rx_buf) = ([0u8; 256], [0u8; 256]);
    let mut uart = BufferedUart::new(
        p.UART0,
        p.PIN_0,
        p.PIN_1,
        Irqs,
        &mut tx_buf,
        &mut rx_buf,
        config,
    );
    let mut led = embassy_rp::gpio::Output::new(p.PIN_25, embassy_rp::gpio::Level::Low);
    let mut shim = Shim::<256, 64>::new(Config {
        name: "pico",
        firmware: "0.1.0",
        services: SERVICES,
        heartbeat_ms: 500,
        key: None,
    });
    loop {
        let now = Instant::now().as_millis() as u32;
        let _ = shim.pump(&mut uart, now);
        if LED.load(Ordering::Relaxed) == 0 {
            led.set_low();
        } else {
            led.set_high();
        }
        // The receive buffer holds 256 bytes: at 115200 baud, 22 ms of line.
        Timer::after_micros(500).await;
    }
}
