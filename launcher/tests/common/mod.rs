//! What the binary's integration tests share: small data sets written in their real formats,
//! free ports for rendezvous.

#![allow(dead_code)] // each test file uses its own part

use std::path::Path;

/// Writes a small CIFAR-10 in its real binary format: 5 training batches and a test batch of
/// `n` records each (label byte + 3072 pixel bytes), each record a fixed pattern of its index.
pub fn write_cifar10(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let record = |i: usize| {
        let mut r = vec![(i % 10) as u8];
        r.extend((0..3072).map(|p| ((p * 7 + i * 13) % 256) as u8));
        r
    };
    let batch = |offset: usize| (0..n).flat_map(|i| record(offset + i)).collect::<Vec<u8>>();
    for b in 1..=5 {
        std::fs::write(dir.join(format!("data_batch_{b}.bin")), batch(b * n)).unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), batch(0)).unwrap();
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string()
}
