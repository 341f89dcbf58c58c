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
    /// Undeclared cross-process secret read (environ, mem, ptrace, process_vm_readv, keyctl, socket).
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
