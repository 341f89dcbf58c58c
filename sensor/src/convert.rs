//! Domain ↔ wire (`keywatch.v1`) conversions, all in this module.
//!
//! - [`Observation`] → [`pb::Event`]: infallible (everything the sensor observes has a wire
//!   form); the seq is left at 0 for the uplink to set (see [`append_seq`]).
//! - [`pb::WatchSpec`] → [`WatchSpec`]: checked ([`TryFrom`]), since a policy comes from the
//!   network; [`WatchSpec`] → [`pb::WatchSpec`] for the other direction.
//! - [`pb::Policy`] → [`WatchSet`]: every spec converted and validated, all problems reported.

use keywatch_proto::v1 as pb;
use prost::Message as _;

use crate::{
    observation::{Identity, Observation, What},
    process::Ancestor,
    watch::{Category, SpecProblem, WatchSet, WatchSpec},
};

/// Largest policy the sensor accepts: a bound on what a misbehaving collector can make it
/// resolve (each watch costs file-system walks and DNS lookups).
pub const MAX_POLICY_WATCHES: usize = 10_000;

/// A wire message that does not make sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("watch {name:?}: unknown or unspecified category {value}")]
    Category { name: String, value: i32 },
    #[error("policy has {count} watches, more than the limit of {max}")]
    TooManyWatches { count: usize, max: usize },
    #[error("policy version {version}: {}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    InvalidPolicy { version: u64, problems: Vec<SpecProblem> },
}

impl From<Category> for pb::WatchCategory {
    fn from(c: Category) -> Self {
        match c {
            Category::Credential => Self::Credential,
            Category::Secret => Self::Secret,
            Category::AuthEndpoint => Self::AuthEndpoint,
        }
    }
}

impl TryFrom<pb::WatchSpec> for WatchSpec {
    type Error = ConvertError;

    fn try_from(w: pb::WatchSpec) -> Result<Self, Self::Error> {
        let category = Category::from_proto(w.category)
            .ok_or_else(|| ConvertError::Category { name: w.name.clone(), value: w.category })?;
        Ok(Self {
            name: w.name,
            category,
            paths: w.paths,
            endpoints: w.endpoints,
            unix_sockets: w.unix_sockets,
        })
    }
}

impl From<WatchSpec> for pb::WatchSpec {
    fn from(w: WatchSpec) -> Self {
        Self {
            name: w.name,
            category: pb::WatchCategory::from(w.category) as i32,
            paths: w.paths,
            endpoints: w.endpoints,
            unix_sockets: w.unix_sockets,
        }
    }
}

/// The watch set a policy describes: every spec checked (unknown categories), then the set as a
/// whole (names, patterns, endpoints: [`WatchSet::from_specs`]), every problem reported.
pub fn policy_watch_set(policy: &pb::Policy) -> Result<WatchSet, ConvertError> {
    if policy.watches.len() > MAX_POLICY_WATCHES {
        return Err(ConvertError::TooManyWatches {
            count: policy.watches.len(),
            max: MAX_POLICY_WATCHES,
        });
    }
    let specs =
        policy.watches.iter().cloned().map(WatchSpec::try_from).collect::<Result<Vec<_>, _>>()?;
    WatchSet::from_specs(specs)
        .map_err(|problems| ConvertError::InvalidPolicy { version: policy.version, problems })
}

fn ancestor(a: &Ancestor) -> pb::Ancestor {
    pb::Ancestor {
        pid: a.pid,
        exe: a.exe.to_string_lossy().into_owned(),
        comm: a.comm.clone(),
        start_time_ns: a.start_time_ns,
    }
}

impl From<&Identity> for pb::ProcessIdentity {
    fn from(p: &Identity) -> Self {
        Self {
            pid: p.pid,
            tid: p.tid,
            ppid: p.ppid,
            uid: p.uid,
            euid: p.euid,
            gid: p.gid,
            // The kernel's "unset" (u32::MAX) is absence on the wire.
            login_uid: p.login_uid.filter(|&u| u != u32::MAX),
            comm: p.comm.clone(),
            exe: p.exe.clone(),
            exe_sha256: p.exe_sha256.clone().unwrap_or_default(),
            cmdline: p.cmdline.clone(),
            cgroup_id: p.cgroup_id,
            cgroup_path: p.cgroup_path.clone(),
            container_id: p.container_id.clone().unwrap_or_default(),
            pod_uid: p.pod_uid.clone().unwrap_or_default(),
            systemd_unit: p.systemd_unit.clone().unwrap_or_default(),
            start_time_ns: p.start_time_ns,
            tty: p.tty.clone().unwrap_or_default(),
            ancestors: p.ancestors.iter().map(ancestor).collect(),
        }
    }
}

/// The wire enum of a secret-access method, from the name the enricher gives it.
fn secret_method(method: &str) -> pb::SecretMethod {
    match method {
        "proc_environ" => pb::SecretMethod::ProcEnviron,
        "proc_mem" => pb::SecretMethod::ProcMem,
        "ptrace" => pb::SecretMethod::Ptrace,
        "process_vm_readv" => pb::SecretMethod::ProcessVmReadv,
        "process_vm_writev" => pb::SecretMethod::ProcessVmWritev,
        "keyctl" => pb::SecretMethod::Keyctl,
        "unix_socket" => pb::SecretMethod::UnixSocket,
        _ => pb::SecretMethod::Unspecified,
    }
}

fn protocol(p: &str) -> pb::Protocol {
    match p {
        "tcp" => pb::Protocol::Tcp,
        "udp" => pb::Protocol::Udp,
        _ => pb::Protocol::Unspecified,
    }
}

impl From<&What> for pb::event::Kind {
    fn from(what: &What) -> Self {
        use pb::event::Kind as K;
        match what {
            What::FileOpen { watch, category: _, path, dev, ino, flags, write, held } => {
                K::FileAccess(pb::FileAccess {
                    held: *held,
                    watch: watch.clone(),
                    path: path.clone(),
                    dev: u64::from(*dev),
                    ino: *ino,
                    flags: *flags,
                    write: *write,
                })
            }
            What::SecretAccess {
                method,
                target_pid,
                target_ns_pid,
                target,
                watch,
                path,
                detail,
            } => K::SecretAccess(pb::SecretAccess {
                method: secret_method(method) as i32,
                target_pid: *target_pid,
                target_ns_pid: target_ns_pid.unwrap_or(0),
                target: target.as_deref().map(pb::ProcessIdentity::from),
                watch: watch.clone().unwrap_or_default(),
                path: path.clone().unwrap_or_default(),
                detail: *detail,
            }),
            What::Connect { watch, category: _, address, port, protocol: p } => {
                K::Connect(pb::Connect {
                    watch: watch.clone(),
                    address: address.to_string(),
                    port: u32::from(*port),
                    protocol: protocol(p) as i32,
                })
            }
            What::PrivilegeChange {
                via,
                old_uid,
                old_euid,
                new_uid,
                new_euid,
                old_gid,
                new_gid,
                old_cap_effective,
                new_cap_effective,
            } => K::PrivilegeChange(pb::PrivilegeChange {
                via: (*via).to_owned(),
                old_uid: *old_uid,
                old_euid: *old_euid,
                new_uid: *new_uid,
                new_euid: *new_euid,
                old_gid: *old_gid,
                new_gid: *new_gid,
                old_cap_effective: *old_cap_effective,
                new_cap_effective: *new_cap_effective,
            }),
            What::Exec { filename } => {
                K::Exec(pb::Exec { filename: filename.clone(), argv: Vec::new(), old_pid: 0 })
            }
            What::Fork { child_pid } => K::Fork(pb::Fork { child_pid: *child_pid }),
            // The kernel's exit code is the raw wait status word; the wire keeps its bits.
            What::Exit { exit_code } => {
                K::Exit(pb::Exit { exit_code: i32::from_ne_bytes(exit_code.to_ne_bytes()) })
            }
        }
    }
}

impl From<&Observation> for pb::Event {
    /// The event with seq 0: the spool assigns seqs (see [`append_seq`]).
    fn from(o: &Observation) -> Self {
        Self {
            seq: 0,
            time_ns: o.time_ns,
            count: o.count.max(1),
            process: Some(pb::ProcessIdentity::from(&o.process)),
            kind: Some(pb::event::Kind::from(&o.what)),
        }
    }
}

/// The observation as an encoded `keywatch.v1.Event` without its seq.
pub fn encode_observation(o: &Observation) -> Vec<u8> {
    pb::Event::from(o).encode_to_vec()
}

/// Appends field 1 (`seq`) to an event encoded without it. Protobuf decoders accept fields in
/// any order, so the result decodes as the same event with that seq; this lets the sensor
/// encode events before the spool assigns their seqs, and send spooled bytes as they are.
pub fn append_seq(encoded: &mut Vec<u8>, seq: u64) {
    prost::encoding::uint64::encode(1, &seq, encoded);
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn identity() -> Identity {
        Identity {
            pid: 42,
            tid: 43,
            ppid: 1,
            uid: 1000,
            euid: 1000,
            gid: 1000,
            login_uid: Some(u32::MAX),
            comm: "cat".into(),
            exe: "/usr/bin/cat".into(),
            exe_sha256: Some("ab".repeat(32)),
            cmdline: vec!["cat".into(), "/root/.aws/credentials".into()],
            cgroup_id: 7,
            cgroup_path: "/user.slice".into(),
            container_id: None,
            pod_uid: None,
            systemd_unit: Some("ssh.service".into()),
            start_time_ns: 1_700_000_000_000_000_000,
            tty: Some("pts/0".into()),
            ancestors: vec![Ancestor {
                pid: 1,
                exe: "/sbin/init".into(),
                comm: "init".into(),
                start_time_ns: 5,
            }],
        }
    }

    fn observation(what: What) -> Observation {
        Observation {
            time_ns: 1_700_000_000_123_456_789,
            count: 3,
            process: identity(),
            what,
            mark: 0,
            ring_pos: 0,
        }
    }

    #[test]
    fn file_open_becomes_file_access() {
        let o = observation(What::FileOpen {
            watch: "aws-credentials".into(),
            category: Some(Category::Credential),
            path: "/root/.aws/credentials".into(),
            dev: 2049,
            ino: 1234,
            flags: 0,
            write: false,
            held: true,
        });
        let e = pb::Event::from(&o);
        assert_eq!(e.seq, 0);
        assert_eq!(e.time_ns, o.time_ns);
        assert_eq!(e.count, 3);
        let p = e.process.expect("process");
        assert_eq!((p.pid, p.tid, p.login_uid), (42, 43, None), "unset login uid is absent");
        assert_eq!(p.exe_sha256.len(), 64);
        assert_eq!(p.systemd_unit, "ssh.service");
        assert_eq!(p.ancestors[0].exe, "/sbin/init");
        let Some(pb::event::Kind::FileAccess(f)) = e.kind else { panic!("kind") };
        assert_eq!(
            (f.watch.as_str(), f.path.as_str()),
            ("aws-credentials", "/root/.aws/credentials")
        );
        assert_eq!((f.dev, f.ino, f.write, f.held), (2049, 1234, false, true));
    }

    #[test]
    fn every_kind_converts() {
        let cases = [
            What::SecretAccess {
                method: "ptrace",
                target_pid: 9,
                target_ns_pid: Some(3),
                target: Some(Box::new(identity())),
                watch: None,
                path: None,
                detail: 16,
            },
            What::Connect {
                watch: "imds".into(),
                category: Some(Category::AuthEndpoint),
                address: IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
                port: 80,
                protocol: "tcp",
            },
            What::PrivilegeChange {
                via: "setuid",
                old_uid: 1000,
                old_euid: 1000,
                new_uid: 0,
                new_euid: 0,
                old_gid: 1,
                new_gid: 0,
                old_cap_effective: 0,
                new_cap_effective: u64::MAX,
            },
            What::Exec { filename: "/bin/sh".into() },
            What::Fork { child_pid: 77 },
            What::Exit { exit_code: 256 },
        ];
        for what in cases {
            let e = pb::Event::from(&observation(what.clone()));
            use pb::event::Kind as K;
            match (&what, e.kind.expect("kind")) {
                (What::SecretAccess { .. }, K::SecretAccess(s)) => {
                    assert_eq!(s.method, pb::SecretMethod::Ptrace as i32);
                    assert_eq!(s.target.expect("target").pid, 42);
                    assert_eq!((s.target_pid, s.target_ns_pid, s.detail), (9, 3, 16));
                }
                (What::Connect { .. }, K::Connect(c)) => {
                    assert_eq!((c.address.as_str(), c.port), ("169.254.169.254", 80));
                    assert_eq!(c.protocol, pb::Protocol::Tcp as i32);
                }
                (What::PrivilegeChange { .. }, K::PrivilegeChange(p)) => {
                    assert_eq!((p.via.as_str(), p.new_euid, p.new_gid), ("setuid", 0, 0));
                }
                (What::Exec { .. }, K::Exec(x)) => assert_eq!(x.filename, "/bin/sh"),
                (What::Fork { .. }, K::Fork(f)) => assert_eq!(f.child_pid, 77),
                (What::Exit { .. }, K::Exit(x)) => assert_eq!(x.exit_code, 256),
                (what, kind) => panic!("{what:?} became {kind:?}"),
            }
        }
    }

    #[test]
    fn every_secret_method_has_a_wire_value() {
        let methods = [
            "proc_environ",
            "proc_mem",
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "keyctl",
            "unix_socket",
        ];
        for m in methods {
            assert_ne!(secret_method(m), pb::SecretMethod::Unspecified, "{m}");
        }
    }

    #[test]
    fn a_count_of_zero_is_sent_as_one() {
        let mut o = observation(What::Fork { child_pid: 1 });
        o.count = 0;
        assert_eq!(pb::Event::from(&o).count, 1);
    }

    #[test]
    fn appended_seq_decodes_as_the_event_seq() {
        let o = observation(What::Exec { filename: "/bin/true".into() });
        let mut bytes = encode_observation(&o);
        append_seq(&mut bytes, 123_456_789_012);
        let decoded = pb::Event::decode(bytes.as_slice()).expect("decodes");
        let mut expected = pb::Event::from(&o);
        expected.seq = 123_456_789_012;
        assert_eq!(decoded, expected);
    }

    fn wire_spec(name: &str, category: i32) -> pb::WatchSpec {
        pb::WatchSpec {
            name: name.into(),
            category,
            paths: vec!["/etc/keywatch-test/secret".into()],
            endpoints: vec!["169.254.169.254:80".into()],
            unix_sockets: vec!["/run/docker.sock".into()],
        }
    }

    #[test]
    fn watch_spec_round_trips() {
        let wire = wire_spec("test-watch", pb::WatchCategory::Secret as i32);
        let spec = WatchSpec::try_from(wire.clone()).expect("valid");
        assert_eq!(spec.category, Category::Secret);
        assert_eq!(spec.unix_sockets, ["/run/docker.sock"]);
        assert_eq!(pb::WatchSpec::from(spec), wire);
    }

    #[test]
    fn unknown_category_is_refused() {
        for value in [0, 99] {
            let err = WatchSpec::try_from(wire_spec("w", value)).unwrap_err();
            assert_eq!(err, ConvertError::Category { name: "w".into(), value });
        }
    }

    #[test]
    fn policy_is_validated_as_a_whole() {
        let good = pb::Policy { version: 3, watches: vec![wire_spec("a", 1), wire_spec("b", 3)] };
        let set = policy_watch_set(&good).expect("valid policy");
        assert_eq!(set.len(), 2);
        assert_eq!(set.name(1), Some("b"));

        let dup = pb::Policy { version: 4, watches: vec![wire_spec("a", 1), wire_spec("a", 1)] };
        let err = policy_watch_set(&dup).unwrap_err();
        assert!(matches!(err, ConvertError::InvalidPolicy { version: 4, .. }), "{err}");
        assert!(err.to_string().contains("duplicate name"), "{err}");

        let mut bad_path = wire_spec("c", 1);
        bad_path.paths = vec!["relative/path".into()];
        assert!(policy_watch_set(&pb::Policy { version: 5, watches: vec![bad_path] }).is_err());

        let huge = pb::Policy {
            version: 6,
            watches: (0..=MAX_POLICY_WATCHES).map(|i| wire_spec(&format!("w{i}"), 1)).collect(),
        };
        assert!(matches!(policy_watch_set(&huge), Err(ConvertError::TooManyWatches { .. })));
    }
}
