//! The load generator against a real node (the server library on
//! 127.0.0.1:0, real SQLite file, real QUIC): every accepted message is
//! pushed to its recipient exactly once and measured; an idle run holds its
//! subscribed clients through the window.

#![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

use std::time::Duration;

use quicnprotochat_client::node_client::ConnectOptions;
use quicnprotochat_load::{Idle, Scenario, Shape, idle, run};
use quicnprotochat_server::testing::TestNode;

/// A node taking sends as fast as they come, and how to reach it.
fn start_node() -> (TestNode, ConnectOptions) {
    let node = TestNode::builder()
        .configure(|config| config.enqueue_rate = 0)
        .start();
    let options = ConnectOptions {
        server: node.addr.to_string(),
        server_name: None,
        ca_cert: node.cert().to_owned(),
    };
    (node, options)
}

fn scenario(shape: Shape, rate: Option<f64>, batch: usize) -> Scenario {
    Scenario {
        shape,
        payload: 100,
        duration: Duration::from_millis(700),
        rate,
        window: 4,
        batch,
        message_ids: false,
        ack_every: Duration::ZERO,
        threads: 2,
    }
}

#[test]
fn every_message_of_a_ring_and_a_fan_out_is_pushed_and_timed() {
    let (_node, options) = start_node();
    for (name, scenario) in [
        ("ring, unpaced", scenario(Shape::Ring(4), None, 1)),
        ("ring, paced, batches", scenario(Shape::Ring(3), Some(400.0), 4)),
        ("fan-out", scenario(Shape::FanOut(5), None, 1)),
        (
            "ring, message ids",
            Scenario {
                message_ids: true,
                ..scenario(Shape::Ring(3), None, 1)
            },
        ),
        (
            "ring, acks every 20 ms",
            Scenario {
                ack_every: Duration::from_millis(20),
                ..scenario(Shape::Ring(3), None, 1)
            },
        ),
    ] {
        let report = run(&options, &scenario, None).unwrap();
        println!("{name}: {report}");
        assert!(report.sent > 0, "{name}: something was sent");
        assert_eq!(report.refused, 0, "{name}");
        assert_eq!(
            report.delivered, report.sent,
            "{name}: every message delivered once"
        );
        assert_eq!(report.latencies.len() as u64, report.delivered, "{name}");
        assert_eq!(report.bytes, report.delivered * 100, "{name}");
        assert!(report.latency(0.0) > Duration::ZERO, "{name}");
        assert!(report.latency(0.5) <= report.latency(0.99), "{name}");
        assert!(
            report.elapsed >= Duration::from_millis(600),
            "{name}: {:?}",
            report.elapsed
        );
        assert!(report.node.is_none(), "{name}: no node process to probe");
    }
    // A paced run sends at its rate: 400 msgs/s for 0.7 s is about 280.
    let paced = run(&options, &scenario(Shape::Ring(2), Some(400.0), 1), None).unwrap();
    assert!((200..=340).contains(&paced.sent), "sent {}", paced.sent);
}

#[test]
fn an_idle_run_subscribes_every_client_and_measures_the_whole_window() {
    let (_node, options) = start_node();
    let window = Duration::from_millis(300);
    let idle_run = Idle {
        clients: 5,
        duration: window,
        threads: 2,
    };
    let report = idle(&options, &idle_run, None).unwrap();
    println!("{report}");
    assert_eq!(report.clients, 5);
    assert!(report.setup > Duration::ZERO);
    assert!(report.window >= window, "{:?}", report.window);
    assert!(report.node.is_none(), "no node process to probe");
    assert!(report.to_string().contains("node usage unknown"), "{report}");
    // The clients were closed: a ring run on the same node still works.
    let after = run(&options, &scenario(Shape::Ring(2), None, 1), None).unwrap();
    assert_eq!(after.delivered, after.sent);
}
