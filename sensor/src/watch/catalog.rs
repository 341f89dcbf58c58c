//! The built-in catalog: what counts as a credential, secret or auth endpoint on a typical Linux
//! host before anyone configures anything.
//!
//! | name | category | what |
//! |---|---|---|
//! | `aws-credentials` | credential | `~/.aws/credentials`, `~/.aws/config`, SSO and CLI token caches |
//! | `gcp-credentials` | credential | gcloud application-default credentials, `credentials.db`, `access_tokens.db`, legacy credentials |
//! | `azure-credentials` | credential | `~/.azure/accessTokens.json`, MSAL token caches, service-principal entries |
//! | `ssh-private-keys` | credential | `~/.ssh/id_*` except `*.pub` |
//! | `ssh-host-keys` | credential | `/etc/ssh/ssh_host_*_key` |
//! | `kubeconfig` | credential | `~/.kube/config`, `/etc/kubernetes/*.conf` (admin, super-admin, kubelet, controller-manager, scheduler) |
//! | `k8s-service-account-token` | credential | `/var/run/secrets/kubernetes.io/serviceaccount/token` (and `/run/…`), projected tokens of every pod under `/var/lib/kubelet/pods` |
//! | `docker-config` | credential | `~/.docker/config.json` |
//! | `git-credentials` | credential | `~/.git-credentials`, `~/.config/git/credentials` |
//! | `netrc` | credential | `~/.netrc` |
//! | `pgpass` | credential | `~/.pgpass` |
//! | `vault-token` | credential | `~/.vault-token` |
//! | `shadow` | credential | `/etc/shadow`, `/etc/gshadow` |
//! | `gnupg-private-keys` | credential | `~/.gnupg/private-keys-v1.d/*`, `~/.gnupg/secring.gpg` |
//! | `ssh-agent` | secret | agent sockets: `/tmp/ssh-*/agent.*`, `/run/user/*/keyring/ssh`, `/run/user/*/gnupg/S.gpg-agent.ssh` |
//! | `container-runtime-socket` | secret | `docker.sock`, `containerd.sock`, `crio.sock`, `podman.sock` |
//! | `vault-agent` | secret | Vault agent listener sockets under `/run/vault*` |
//! | `cloud-metadata` | auth-endpoint | `169.254.169.254:80`, `169.254.170.2:80` (ECS), `[fd00:ec2::254]:80`, `100.100.100.200:80` (Alibaba) |
//! | `aws-sts` | auth-endpoint | `sts.amazonaws.com:443` |
//! | `gcp-oauth` | auth-endpoint | `oauth2.googleapis.com:443`, `sts.googleapis.com:443`, `iamcredentials.googleapis.com:443`, `accounts.google.com:443` |
//! | `azure-ad` | auth-endpoint | `login.microsoftonline.com:443`, `login.windows.net:443` |
//! | `kubernetes-api` | auth-endpoint | any address, port 6443 |
//! | `vault-api` | auth-endpoint | any address, port 8200 |
//! | `kerberos` | auth-endpoint | any address, port 88, TCP and UDP |
//! | `ldap` | auth-endpoint | any address, ports 389 and 636 |
//!
//! Names are part of the interface: declarations and alerts use them, so they never change.

use super::spec::{Category, WatchSpec};

fn spec(
    name: &str,
    category: Category,
    paths: &[&str],
    endpoints: &[&str],
    sockets: &[&str],
) -> WatchSpec {
    let owned = |list: &[&str]| list.iter().map(|s| (*s).to_string()).collect();
    WatchSpec {
        name: name.to_string(),
        category,
        paths: owned(paths),
        endpoints: owned(endpoints),
        unix_sockets: owned(sockets),
    }
}

/// The built-in watches, in a fixed order (see the module table).
pub fn builtin_catalog() -> Vec<WatchSpec> {
    use Category::{AuthEndpoint, Credential, Secret};
    vec![
        spec(
            "aws-credentials",
            Credential,
            &[
                "~/.aws/credentials",
                "~/.aws/config",
                "~/.aws/sso/cache/*.json",
                "~/.aws/cli/cache/*.json",
            ],
            &[],
            &[],
        ),
        spec(
            "gcp-credentials",
            Credential,
            &[
                "~/.config/gcloud/application_default_credentials.json",
                "~/.config/gcloud/credentials.db",
                "~/.config/gcloud/access_tokens.db",
                "~/.config/gcloud/legacy_credentials/*/adc.json",
            ],
            &[],
            &[],
        ),
        spec(
            "azure-credentials",
            Credential,
            &[
                "~/.azure/accessTokens.json",
                "~/.azure/msal_token_cache.json",
                "~/.azure/msal_token_cache.bin",
                "~/.azure/service_principal_entries.json",
            ],
            &[],
            &[],
        ),
        spec("ssh-private-keys", Credential, &["~/.ssh/id_*", "!~/.ssh/*.pub"], &[], &[]),
        spec("ssh-host-keys", Credential, &["/etc/ssh/ssh_host_*_key"], &[], &[]),
        spec(
            "kubeconfig",
            Credential,
            &[
                "~/.kube/config",
                "/etc/kubernetes/admin.conf",
                "/etc/kubernetes/super-admin.conf",
                "/etc/kubernetes/kubelet.conf",
                "/etc/kubernetes/controller-manager.conf",
                "/etc/kubernetes/scheduler.conf",
            ],
            &[],
            &[],
        ),
        spec(
            "k8s-service-account-token",
            Credential,
            &[
                "/var/run/secrets/kubernetes.io/serviceaccount/token",
                "/run/secrets/kubernetes.io/serviceaccount/token",
                "/var/lib/kubelet/pods/*/volumes/kubernetes.io~projected/*/token",
            ],
            &[],
            &[],
        ),
        spec("docker-config", Credential, &["~/.docker/config.json"], &[], &[]),
        spec(
            "git-credentials",
            Credential,
            &["~/.git-credentials", "~/.config/git/credentials"],
            &[],
            &[],
        ),
        spec("netrc", Credential, &["~/.netrc"], &[], &[]),
        spec("pgpass", Credential, &["~/.pgpass"], &[], &[]),
        spec("vault-token", Credential, &["~/.vault-token"], &[], &[]),
        spec("shadow", Credential, &["/etc/shadow", "/etc/gshadow"], &[], &[]),
        spec(
            "gnupg-private-keys",
            Credential,
            &["~/.gnupg/private-keys-v1.d/*", "~/.gnupg/secring.gpg"],
            &[],
            &[],
        ),
        spec(
            "ssh-agent",
            Secret,
            &[],
            &[],
            &["/tmp/ssh-*/agent.*", "/run/user/*/keyring/ssh", "/run/user/*/gnupg/S.gpg-agent.ssh"],
        ),
        spec(
            "container-runtime-socket",
            Secret,
            &[],
            &[],
            &[
                "/run/docker.sock",
                "/var/run/docker.sock",
                "/run/containerd/containerd.sock",
                "/run/crio/crio.sock",
                "/run/podman/podman.sock",
            ],
        ),
        spec("vault-agent", Secret, &[], &[], &["/run/vault*/*.sock"]),
        spec(
            "cloud-metadata",
            AuthEndpoint,
            &[],
            &["169.254.169.254:80", "169.254.170.2:80", "[fd00:ec2::254]:80", "100.100.100.200:80"],
            &[],
        ),
        spec("aws-sts", AuthEndpoint, &[], &["sts.amazonaws.com:443"], &[]),
        spec(
            "gcp-oauth",
            AuthEndpoint,
            &[],
            &[
                "oauth2.googleapis.com:443",
                "sts.googleapis.com:443",
                "iamcredentials.googleapis.com:443",
                "accounts.google.com:443",
            ],
            &[],
        ),
        spec(
            "azure-ad",
            AuthEndpoint,
            &[],
            &["login.microsoftonline.com:443", "login.windows.net:443"],
            &[],
        ),
        spec("kubernetes-api", AuthEndpoint, &[], &[":6443"], &[]),
        spec("vault-api", AuthEndpoint, &[], &[":8200"], &[]),
        spec("kerberos", AuthEndpoint, &[], &[":88"], &[]),
        spec("ldap", AuthEndpoint, &[], &[":389", ":636"], &[]),
    ]
}
