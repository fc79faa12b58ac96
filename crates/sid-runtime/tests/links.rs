//! Links check what they receive: a fake rank 0 (a thread of this test with its own Gloo
//! group, on 127.0.0.1) sends malformed and hostile frame headers to a real served stage
//! (rank 1, `sid_runtime::serve`). Each ends the stage with one line naming rank 0 — never a
//! panic inside libtorch, never an allocation of the size a header claims.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::model;
use sid_core::StagePlan;
use sid_dist::{Backend, Group, Store};
use sid_runtime::ranks::DOWN;
use sid_runtime::{Ranks, StagedConfig};
use tch::{Device, Tensor};

const T: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The wire layout of a frame header (see `links.rs`): 48 int64s, the frame's numbers, then
/// per tensor its kind code, its number of dimensions and up to 7 sizes.
const HEADER: usize = 48;
const FIXED: usize = 10;
const TRAIN: i64 = 1;
const FLOAT: i64 = 6;
const INT64: i64 = 4;

/// A training frame's header for one micro-batch with the given tensors (kind code, size).
fn train(tensors: &[(i64, &[i64])]) -> [i64; HEADER] {
    let mut h = [0i64; HEADER];
    h[0] = TRAIN;
    h[1] = 1; // step
    h[2] = 0; // micro-batch
    h[3] = 1; // micro-batches
    h[4] = 1f64.to_bits() as i64; // scale
    h[9] = tensors.len() as i64;
    for (i, (code, size)) in tensors.iter().enumerate() {
        let at = FIXED + i * 9;
        h[at] = *code;
        h[at + 1] = size.len() as i64;
        h[at + 2..at + 2 + size.len()].copy_from_slice(size);
    }
    h
}

/// Serves stage 2 as rank 1 while a fake rank 0 sends it `header` (and nothing else); returns
/// the error that ended the stage.
fn served_against(header: [i64; HEADER]) -> String {
    let port = free_port();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let fake = std::thread::spawn(move || {
        let store = Store::connect("127.0.0.1", port, true, 2, T).unwrap();
        let g = Group::new(&store, "links", 0, 2, Backend::Gloo, "127.0.0.1", T).unwrap();
        g.send(&Tensor::from_slice(&header), 1, DOWN, T).unwrap();
        // Keep the store and group until rank 1 has given up.
        let _ = done_rx.recv_timeout(Duration::from_secs(60));
    });
    let store = Store::connect("127.0.0.1", port, false, 2, T).unwrap();
    let g = Group::new(&store, "links", 1, 2, Backend::Gloo, "127.0.0.1", T).unwrap();
    let ranks = Ranks {
        world: Arc::new(g),
        replicas: 1,
        replica_group: None,
        names: vec!["rank 0, cpu".into(), "rank 1, cpu".into()],
        liveness: None,
        direct: BTreeMap::new(),
    };
    let m = model();
    let mut cfg = StagedConfig::new(
        m.clone(),
        vec![Device::Cpu; 2],
        StagePlan::even(&m, 2).unwrap(),
    );
    cfg.timeout = T;
    let started = Instant::now();
    let err = sid_runtime::serve(&cfg, &ranks)
        .expect_err("a malformed frame must end the stage")
        .to_string();
    assert!(started.elapsed() < T, "took {:?}", started.elapsed());
    let _ = done_tx.send(());
    fake.join().unwrap();
    err
}

#[test]
fn malformed_and_hostile_frames_are_one_line_errors_naming_the_rank() {
    assert!(
        sid_dist::available().0,
        "this build has no c10d (libgloo-dev missing)"
    );
    let _rng = common::rng_lock();
    let good_x: &[i64] = &[16, 1, 8, 8];
    let good_p: &[i64] = &[16, 5];
    let good_y: &[i64] = &[16];
    let mut negative_count = train(&[]);
    negative_count[9] = -3;
    let mut unknown_kind = train(&[]);
    unknown_kind[0] = 99;
    let mut negative_step = train(&[(FLOAT, good_x), (FLOAT, good_p), (INT64, good_y)]);
    negative_step[1] = -1;
    let mut micro_past_count = train(&[(FLOAT, good_x), (FLOAT, good_p), (INT64, good_y)]);
    micro_past_count[2] = 5;
    let cases: Vec<([i64; HEADER], &str)> = vec![
        // 2^60 floats: 4 EiB claimed.
        (
            train(&[
                (FLOAT, &[1 << 20, 1 << 20, 1 << 20]),
                (FLOAT, good_p),
                (INT64, good_y),
            ]),
            "past",
        ),
        // Sizes whose product overflows.
        (
            train(&[
                (FLOAT, &[i64::MAX, i64::MAX]),
                (FLOAT, good_p),
                (INT64, good_y),
            ]),
            "too large",
        ),
        (
            train(&[(FLOAT, &[-1, 1, 8, 8]), (FLOAT, good_p), (INT64, good_y)]),
            "size [-1, 1, 8, 8]",
        ),
        // Labels as floats.
        (
            train(&[(FLOAT, good_x), (FLOAT, good_p), (FLOAT, good_y)]),
            "is Float, not [Int64]",
        ),
        // A kind code no dtype has.
        (
            train(&[(77, good_x), (FLOAT, good_p), (INT64, good_y)]),
            "unknown tensor kind 77",
        ),
        // Beliefs of 7 classes for a model of 5.
        (
            train(&[(FLOAT, good_x), (FLOAT, &[16, 7]), (INT64, good_y)]),
            "5 classes",
        ),
        // A batch whose labels disagree with its images.
        (
            train(&[(FLOAT, good_x), (FLOAT, good_p), (INT64, &[15])]),
            "sizes",
        ),
        (
            train(&[(FLOAT, good_x), (FLOAT, good_p)]),
            "2 tensors in a frame of kind 1",
        ),
        (negative_count, "-3 tensors"),
        (unknown_kind, "kind 99"),
        (negative_step, "step -1"),
        (micro_past_count, "micro-batch 5 of 1"),
    ];
    for (header, needle) in cases {
        let err = served_against(header);
        assert!(!err.contains('\n'), "not one line: {err}");
        assert!(
            err.contains("rank 0 sent a malformed frame") && err.contains(needle),
            "{needle:?} not in: {err}"
        );
    }
}
