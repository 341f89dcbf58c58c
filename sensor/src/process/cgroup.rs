//! Container, pod and systemd unit from a cgroup v2 path.
//!
//! Runtimes name their cgroups differently and two cgroup drivers exist (systemd: `…-<id>.scope`,
//! cgroupfs: `/docker/<id>`), so every known shape is matched, from the leaf up.

/// What a cgroup path says about where a process runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupIdentity {
    /// Container id (64 hex digits) from docker, containerd, cri-o or podman.
    pub container_id: Option<String>,
    /// Kubernetes pod UID, dashed form.
    pub pod_uid: Option<String>,
    /// The `.service` or `.scope` unit nearest the leaf.
    pub systemd_unit: Option<String>,
}

/// Prefixes runtimes give container scopes under the systemd cgroup driver.
const SCOPE_PREFIXES: [&str; 5] = ["docker-", "cri-containerd-", "crio-", "libpod-", "containerd-"];

/// Parses a cgroup v2 path (`/kubepods.slice/…/cri-containerd-<id>.scope`).
pub fn parse_cgroup_path(path: &str) -> CgroupIdentity {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let kube = parts.iter().any(|p| p.starts_with("kubepods"));
    let mut id = CgroupIdentity::default();
    for (i, part) in parts.iter().enumerate().rev() {
        if id.container_id.is_none() {
            id.container_id = container_id(part, i.checked_sub(1).map(|p| parts[p]), kube);
        }
        if id.pod_uid.is_none() && kube {
            id.pod_uid = pod_uid(part);
        }
        if id.systemd_unit.is_none() && (part.ends_with(".service") || part.ends_with(".scope")) {
            id.systemd_unit = Some((*part).to_string());
        }
    }
    id
}

fn container_id(part: &str, parent: Option<&str>, kube: bool) -> Option<String> {
    let stem = part.strip_suffix(".scope").unwrap_or(part);
    for prefix in SCOPE_PREFIXES {
        if let Some(rest) = stem.strip_prefix(prefix)
            && is_container_hex(rest)
        {
            return Some(rest.to_string());
        }
    }
    // cgroupfs driver: `/docker/<id>`, `/kubepods/burstable/pod<uid>/<id>`.
    let under_runtime = matches!(parent, Some("docker" | "libpod_parent")) || kube;
    (under_runtime && is_container_hex(part)).then(|| part.to_string())
}

fn is_container_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn pod_uid(part: &str) -> Option<String> {
    // systemd driver: `kubepods-burstable-pod<uid with _>.slice`; cgroupfs: `pod<uid>`.
    let raw = if let Some(stem) = part.strip_suffix(".slice") {
        stem.rsplit_once("-pod").map(|(_, uid)| uid)?
    } else {
        part.strip_prefix("pod")?
    };
    let uid = raw.replace('_', "-");
    is_uuid(&uid).then_some(uid)
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a0e7c5b1d4a6f8e9c0b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e";
    const POD: &str = "8a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d";
    const POD_US: &str = "8a1b2c3d_4e5f_6a7b_8c9d_0e1f2a3b4c5d";

    fn expect(path: &str, container: Option<&str>, pod: Option<&str>, unit: Option<&str>) {
        let got = parse_cgroup_path(path);
        assert_eq!(got.container_id.as_deref(), container, "container id of {path}");
        assert_eq!(got.pod_uid.as_deref(), pod, "pod uid of {path}");
        assert_eq!(got.systemd_unit.as_deref(), unit, "unit of {path}");
    }

    #[test]
    fn docker_systemd_driver() {
        let path = format!("/system.slice/docker-{ID}.scope");
        expect(&path, Some(ID), None, Some(&format!("docker-{ID}.scope")));
    }

    #[test]
    fn docker_cgroupfs_driver() {
        expect(&format!("/docker/{ID}"), Some(ID), None, None);
    }

    #[test]
    fn kubernetes_containerd_systemd_driver() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_US}.slice/cri-containerd-{ID}.scope"
        );
        let unit = format!("cri-containerd-{ID}.scope");
        expect(&path, Some(ID), Some(POD), Some(&unit));
    }

    #[test]
    fn kubernetes_guaranteed_pod_crio() {
        let path = format!("/kubepods.slice/kubepods-pod{POD_US}.slice/crio-{ID}.scope");
        expect(&path, Some(ID), Some(POD), Some(&format!("crio-{ID}.scope")));
    }

    #[test]
    fn kubernetes_cgroupfs_driver() {
        let path = format!("/kubepods/besteffort/pod{POD}/{ID}");
        expect(&path, Some(ID), Some(POD), None);
    }

    #[test]
    fn crio_conmon_is_not_a_container() {
        let path = format!("/kubepods.slice/kubepods-pod{POD_US}.slice/crio-conmon-{ID}.scope");
        expect(&path, None, Some(POD), Some(&format!("crio-conmon-{ID}.scope")));
    }

    #[test]
    fn podman_libpod() {
        let path = format!("/machine.slice/libpod-{ID}.scope/container");
        expect(&path, Some(ID), None, Some(&format!("libpod-{ID}.scope")));
        let rootless =
            format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope");
        expect(&rootless, Some(ID), None, Some(&format!("libpod-{ID}.scope")));
    }

    #[test]
    fn plain_services_and_sessions() {
        expect("/system.slice/sshd.service", None, None, Some("sshd.service"));
        expect("/user.slice/user-1000.slice/session-3.scope", None, None, Some("session-3.scope"));
        expect(
            "/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.service",
            None,
            None,
            Some("app-foo.service"),
        );
        expect("/", None, None, None);
        expect("", None, None, None);
    }

    #[test]
    fn hex_that_is_not_under_a_runtime_is_ignored() {
        expect(&format!("/system.slice/{ID}"), None, None, None);
        expect("/docker/abc", None, None, None);
    }
}
