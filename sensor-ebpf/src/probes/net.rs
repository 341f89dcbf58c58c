//! Outbound auth calls: cgroup connect4/connect6 (and sendmsg4/sendmsg6 for unconnected UDP,
//! e.g. Kerberos) on the cgroup2 root, matched against the watched-endpoint LPM trie. cgroup
//! hooks tax nothing but socket address operations. They never block: the return is always 1.

use core::ptr::read_volatile;

use aya_ebpf::{macros::cgroup_sock_addr, maps::lpm_trie::Key, programs::SockAddrContext};
use sensor_ebpf::{
    ConnectEvent, EndpointKey, EndpointValue, EventKind, FoldKey, PROTO_TCP, PROTO_UDP,
};

use super::{
    fold,
    maps::{ENDPOINT_PORTS, ENDPOINTS, EVENTS, SUBMIT_FLAGS, count_lost},
    task::{current_tgid, header, is_self},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_UDP: u32 = 17;
/// Port (16) + IPv4-mapped IPv6 address (128) bits.
const FULL_PREFIX: u32 = 16 + 128;

/// The verdict for every sock_addr hook: allow. Keywatch observes, it does not block here.
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    let _ = on_sock_addr(&ctx, AF_INET);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    let _ = on_sock_addr(&ctx, AF_INET6);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    let _ = on_sock_addr(&ctx, AF_INET);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    let _ = on_sock_addr(&ctx, AF_INET6);
    ALLOW
}

#[inline(always)]
fn on_sock_addr(ctx: &SockAddrContext, family: u32) -> Result<(), i64> {
    // SAFETY: the context is valid for the hook's duration; the verifier checks the access.
    // user_port holds the port in network byte order in its low 16 bits.
    let port_be =
        unsafe { read_volatile(&raw const (*ctx.sock_addr).user_port) as u16 }.to_ne_bytes();
    // Almost every connect on the host is to a port no entry has: decided before anything else.
    let ports = (port_watched(u16::from_be_bytes(port_be)), port_watched(0));
    if ports == (false, false) {
        return Ok(());
    }
    let tgid = current_tgid();
    if is_self(tgid) {
        return Ok(());
    }
    // SAFETY: the context pointer is valid for the duration of the hook; the verifier checks
    // every field access.
    // Each field is read with its own load at a constant offset: the verifier refuses loads
    // through a context pointer the compiler has offset.
    let (protocol, addr) = unsafe {
        let sa = ctx.sock_addr;
        let mut addr = [0u8; 16];
        if family == AF_INET {
            addr[10] = 0xff;
            addr[11] = 0xff;
            let ip = read_volatile(&raw const (*sa).user_ip4);
            addr[12..16].copy_from_slice(&ip.to_ne_bytes());
        } else {
            let w0 = read_volatile(&raw const (*sa).user_ip6[0]);
            let w1 = read_volatile(&raw const (*sa).user_ip6[1]);
            let w2 = read_volatile(&raw const (*sa).user_ip6[2]);
            let w3 = read_volatile(&raw const (*sa).user_ip6[3]);
            addr[0..4].copy_from_slice(&w0.to_ne_bytes());
            addr[4..8].copy_from_slice(&w1.to_ne_bytes());
            addr[8..12].copy_from_slice(&w2.to_ne_bytes());
            addr[12..16].copy_from_slice(&w3.to_ne_bytes());
        }
        (read_volatile(&raw const (*sa).protocol), addr)
    };
    let Some(value) = lookup(ports, port_be, addr) else {
        return Ok(());
    };
    let proto_bit = if protocol == IPPROTO_UDP { PROTO_UDP } else { PROTO_TCP };
    if value.protocols & proto_bit == 0 {
        return Ok(());
    }
    let port = u16::from_be_bytes(port_be) as u32;
    let fold_key = FoldKey::connect(tgid, &addr, protocol, port);
    let Some(total) = fold::occurrence(&fold_key) else {
        return Ok(());
    };
    let Some(mut entry) = EVENTS.reserve::<ConnectEvent>(0) else {
        count_lost(EventKind::Connect);
        fold::record_lost(&fold_key);
        return Ok(());
    };
    entry.write(ConnectEvent {
        header: header(EventKind::Connect),
        watch_id: value.watch_id,
        protocol,
        family,
        port,
        addr,
        total,
    });
    entry.submit(SUBMIT_FLAGS);
    Ok(())
}

/// Exact port first, then the "any port" entries (stored with port 0); each trie look-up
/// only where [`ENDPOINT_PORTS`] says some entry has that port (`ports`: the exact port's
/// mark, the any-port mark).
#[inline(always)]
fn lookup(ports: (bool, bool), port_be: [u8; 2], addr: [u8; 16]) -> Option<EndpointValue> {
    if ports.0 {
        let exact = Key::new(FULL_PREFIX, EndpointKey { port_be, addr, _pad0: [0; 2] });
        if let Some(v) = ENDPOINTS.get(&exact) {
            return Some(*v);
        }
    }
    if !ports.1 {
        return None;
    }
    let any_port = Key::new(FULL_PREFIX, EndpointKey { port_be: [0; 2], addr, _pad0: [0; 2] });
    ENDPOINTS.get(&any_port).copied()
}

#[inline(always)]
fn port_watched(port: u16) -> bool {
    ENDPOINT_PORTS.get(u32::from(port)).is_some_and(|&v| v != 0)
}
