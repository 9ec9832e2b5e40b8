//! The port allocator against real sockets.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;

use common::port_range;
use switchboard::ports::PortAllocator;

#[test]
fn allocates_inside_the_range() {
    let range = port_range(5);
    let a = PortAllocator::new(range.clone());
    let p = a.allocate().unwrap();
    assert!(range.contains(p), "{p} outside {range}");
    assert_eq!(a.in_use(), vec![p]);
}

#[test]
fn every_port_is_handed_out_once_then_exhaustion_names_the_range() {
    let range = port_range(8);
    let a = PortAllocator::new(range.clone());
    let got: Vec<u16> = (0..8).map(|_| a.allocate().unwrap()).collect();
    let unique: HashSet<u16> = got.iter().copied().collect();
    assert_eq!(unique.len(), 8, "{got:?}");
    let err = a.allocate().unwrap_err();
    assert!(err.to_string().contains(&range.to_string()), "{err}");
}

#[test]
fn released_ports_are_reused() {
    let range = port_range(3);
    let a = PortAllocator::new(range.clone());
    let ports: Vec<u16> = (0..3).map(|_| a.allocate().unwrap()).collect();
    assert!(a.allocate().is_err());
    a.release(ports[1]);
    assert_eq!(a.allocate().unwrap(), ports[1]);
    assert!(a.allocate().is_err());
}

#[test]
fn a_port_another_process_listens_on_is_skipped() {
    let range = port_range(3);
    let _held = std::net::TcpListener::bind(("127.0.0.1", range.start)).unwrap();
    let _held_any = std::net::TcpListener::bind(("0.0.0.0", range.start + 1)).unwrap();
    let a = PortAllocator::new(range.clone());
    assert_eq!(a.allocate().unwrap(), range.end);
    assert!(a.allocate().is_err(), "held ports must never be handed out");
}

#[test]
fn reserved_ports_from_the_store_are_not_handed_out() {
    let range = port_range(2);
    let a = PortAllocator::new(range.clone());
    a.reserve(range.start);
    assert_eq!(a.allocate().unwrap(), range.end);
    assert!(a.allocate().is_err());
}
