//! Telemetry is counted once however it arrives (issue 18, a property): a node cuts its calls
//! into numbered batches and, at each delivery, sends every batch its gateway has not
//! acknowledged, in order. The gateway's answers may be lost, so batches come again; the node may
//! die, losing what it held, and its next incarnation says how many batches that was. The
//! gateway's count must then be exactly the calls of the batches it received (each once); every
//! call made is either counted or in what a restart lost; and its gap is what the node said.

use std::collections::BTreeSet;
use std::time::Duration;

use mesh_core::Telemetry;
use mesh_core::telemetry::Bounds;
use mesh_gateway::metrics::Metrics;
use mesh_proto::Status;
use mesh_proto::control::Resources;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// The node makes this many calls.
    Calls(u8),
    /// An interval ends: a batch is cut.
    Cut,
    /// The node sends what is unacknowledged; the gateway's acknowledgement arrives or is lost.
    Deliver { answered: bool },
    /// The node dies and starts again: what it held is lost, and said.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..20).prop_map(Op::Calls),
        3 => Just(Op::Cut),
        3 => any::<bool>().prop_map(|answered| Op::Deliver { answered }),
        1 => Just(Op::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_batch_is_counted_once_and_every_loss_is_a_gap(
        ops in proptest::collection::vec(op(), 1..200)
    ) {
        let mut metrics = Metrics::new();
        let mut boot = 1;
        let mut node = Telemetry::with_bounds(Bounds::default());
        metrics.handle_hello("n", boot, 0);
        // (boot, seq) of every batch the gateway received.
        let mut received = BTreeSet::new();
        let mut expected = 0;
        let mut said_lost = 0;
        let (mut made, mut uncut, mut lost_calls) = (0u64, 0u64, 0u64);
        let mut restarts = 0;
        for op in ops.into_iter().chain([Op::Cut, Op::Deliver { answered: true }]) {
            match op {
                Op::Calls(n) => {
                    for _ in 0..n {
                        node.record_call("svc", "m", "n", "b", Status::Ok, Duration::from_micros(10));
                    }
                    made += u64::from(n);
                    uncut += u64::from(n);
                }
                Op::Cut => {
                    node.cut(Resources::default());
                    uncut = 0;
                }
                Op::Deliver { answered } => {
                    let batches: Vec<_> = node.pending().cloned().collect();
                    for b in &batches {
                        if received.insert((boot, b.seq)) {
                            expected += b.calls.iter().map(|c| c.count).sum::<u64>();
                        }
                        metrics.handle_batch("n", b);
                    }
                    if answered && let Some(last) = batches.last() {
                        node.ack(last.seq);
                    }
                }
                Op::Restart => {
                    // The calls that die with it: its interval, and its batches the gateway
                    // never received.
                    lost_calls += uncut;
                    for b in node.pending() {
                        if !received.contains(&(boot, b.seq)) {
                            lost_calls += b.calls.iter().map(|c| c.count).sum::<u64>();
                        }
                    }
                    uncut = 0;
                    restarts += 1;
                    // What the next start reads from the progress file: batches cut and not
                    // acknowledged, and the interval it was recording.
                    let lost = node.pending().count() as u64 + 1;
                    said_lost += lost;
                    boot += 1;
                    node = Telemetry::with_bounds(Bounds::default());
                    metrics.handle_hello("n", boot, lost);
                }
            }
        }
        prop_assert_eq!(metrics.total_calls(), expected);
        // Nothing is lost that no gap stands for, and nothing is counted twice.
        prop_assert_eq!(metrics.total_calls() + lost_calls, made);
        prop_assert_eq!(metrics.gap("n"), said_lost);
        prop_assert!(said_lost >= restarts);
        if lost_calls > 0 {
            prop_assert!(metrics.gap("n") > 0);
        }
    }
}
