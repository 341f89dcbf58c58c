//! Detection rule names and severities. The names are a stable interface.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A detection rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// A watched credential, secret or endpoint used by a process that matches no workload.
    UnknownIdentity,
    /// A workload used a credential, secret or endpoint it did not declare.
    OutOfPattern,
    /// Declared use outside every window and every approved change.
    OutOfWindow,
    /// Undeclared cross-process secret read (environ, mem, ptrace, process_vm_readv/writev, keyctl, socket).
    SecretMisuse,
    /// uid/euid became 0 or capabilities were gained where the workload does not declare it.
    PrivilegeEscalation,
    /// An identity silent longer than its dormancy period became active.
    DormantIdentity,
    /// A service-account or workload credential used from an interactive session.
    HumanUseOfNhi,
}

impl Rule {
    /// Every rule, in the order help texts list them.
    pub const ALL: [Rule; 7] = [
        Rule::UnknownIdentity,
        Rule::OutOfPattern,
        Rule::OutOfWindow,
        Rule::SecretMisuse,
        Rule::PrivilegeEscalation,
        Rule::DormantIdentity,
        Rule::HumanUseOfNhi,
    ];

    /// The rule's stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownIdentity => "unknown-identity",
            Self::OutOfPattern => "out-of-pattern",
            Self::OutOfWindow => "out-of-window",
            Self::SecretMisuse => "secret-misuse",
            Self::PrivilegeEscalation => "privilege-escalation",
            Self::DormantIdentity => "dormant-identity",
            Self::HumanUseOfNhi => "human-use-of-nhi",
        }
    }

    /// Severity when the Detections settings say nothing.
    pub fn default_severity(self) -> Severity {
        match self {
            Self::SecretMisuse => Severity::Critical,
            Self::UnknownIdentity
            | Self::OutOfPattern
            | Self::PrivilegeEscalation
            | Self::HumanUseOfNhi => Severity::High,
            Self::OutOfWindow | Self::DormantIdentity => Severity::Medium,
        }
    }

    /// MITRE ATT&CK techniques the rule detects use of: `(id, name)`.
    pub fn attack(self) -> &'static [(&'static str, &'static str)] {
        const FILES: (&str, &str) = ("T1552.001", "Unsecured Credentials: Credentials In Files");
        const VALID: (&str, &str) = ("T1078", "Valid Accounts");
        match self {
            Self::UnknownIdentity => &[FILES, VALID, ("T1528", "Steal Application Access Token")],
            Self::OutOfPattern => {
                &[FILES, VALID, ("T1550", "Use Alternate Authentication Material")]
            }
            Self::OutOfWindow => &[VALID, FILES],
            Self::SecretMisuse => &[
                ("T1552", "Unsecured Credentials"),
                ("T1003", "OS Credential Dumping"),
                ("T1055", "Process Injection"),
            ],
            Self::PrivilegeEscalation => &[
                ("T1068", "Exploitation for Privilege Escalation"),
                ("T1548", "Abuse Elevation Control Mechanism"),
            ],
            Self::DormantIdentity => &[VALID],
            Self::HumanUseOfNhi => &[VALID],
        }
    }

    /// The OWASP Non-Human Identities Top 10 (2025) entry the rule relates to: `(id, name)`.
    pub fn owasp_nhi(self) -> (&'static str, &'static str) {
        match self {
            Self::UnknownIdentity => ("NHI2", "Secret Leakage"),
            Self::OutOfPattern => ("NHI9", "NHI Reuse"),
            Self::OutOfWindow => ("NHI7", "Long-Lived Secrets"),
            Self::SecretMisuse => ("NHI2", "Secret Leakage"),
            Self::PrivilegeEscalation => ("NHI5", "Overprivileged NHI"),
            Self::DormantIdentity => ("NHI1", "Improper Offboarding"),
            Self::HumanUseOfNhi => ("NHI10", "Human Use of NHI"),
        }
    }

    /// The framework tags alerts of this rule carry.
    pub fn frameworks(self) -> Frameworks {
        let (id, name) = self.owasp_nhi();
        Frameworks {
            attack: self.attack().iter().map(|(id, _)| (*id).to_owned()).collect(),
            owasp_nhi: format!("{id} {name}"),
        }
    }

    /// One line per rule: what fires it.
    pub fn description(self) -> &'static str {
        match self {
            Self::UnknownIdentity => {
                "a watched credential, secret or endpoint used by a process matching no workload"
            }
            Self::OutOfPattern => "a workload uses a watch it does not declare",
            Self::OutOfWindow => {
                "declared use outside every window and every covering approved change"
            }
            Self::SecretMisuse => {
                "a cross-process secret read or secret-socket connect not declared"
            }
            Self::PrivilegeEscalation => {
                "uid/euid becomes 0 or capabilities are gained, not declared by the workload"
            }
            Self::DormantIdentity => "a workload silent longer than its dormancy period is used",
            Self::HumanUseOfNhi => {
                "a service-account or workload credential used from an interactive session"
            }
        }
    }

    /// Parses a stable rule name.
    pub fn parse(s: &str) -> Option<Rule> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Framework tags on an alert, for coverage reports.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Frameworks {
    /// MITRE ATT&CK technique ids, e.g. `T1552.001`.
    pub attack: Vec<String>,
    /// OWASP Non-Human Identities Top 10 (2025) entry, e.g. `NHI10 Human Use of NHI`.
    pub owasp_nhi: String,
}

/// How urgent an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }

    /// Parses a lowercase name.
    pub fn parse(s: &str) -> Option<Severity> {
        [Self::Low, Self::Medium, Self::High, Self::Critical].into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
