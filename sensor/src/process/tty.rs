//! Controlling terminal name from the `tty_nr` field of `/proc/PID/stat`.

/// Names the terminal device encoded in `tty_nr` (`pts/3`, `tty1`, `ttyS0`); `None` for 0 (no
/// controlling terminal). Unknown majors are named `major:minor` rather than dropped, since
/// having a terminal at all is what marks an interactive session.
pub fn tty_name(tty_nr: u32) -> Option<String> {
    if tty_nr == 0 {
        return None;
    }
    // Encoding of the kernel's new_encode_dev(): minor bits 0-7 and 20-31, major bits 8-19.
    let major = (tty_nr >> 8) & 0xfff;
    let minor = (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00);
    Some(match major {
        136..=143 => format!("pts/{}", (major - 136) * 256 + minor),
        4 if minor < 64 => format!("tty{minor}"),
        4 => format!("ttyS{}", minor - 64),
        5 if minor == 0 => "tty".to_string(),
        5 if minor == 1 => "console".to_string(),
        _ => format!("{major}:{minor}"),
    })
}

#[cfg(test)]
mod tests {
    use super::tty_name;

    fn encode(major: u32, minor: u32) -> u32 {
        (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
    }

    #[test]
    fn names_common_terminals() {
        assert_eq!(tty_name(0), None);
        assert_eq!(tty_name(encode(136, 3)).as_deref(), Some("pts/3"));
        assert_eq!(tty_name(encode(136, 300)).as_deref(), Some("pts/300"));
        assert_eq!(tty_name(encode(137, 1)).as_deref(), Some("pts/257"));
        assert_eq!(tty_name(encode(4, 1)).as_deref(), Some("tty1"));
        assert_eq!(tty_name(encode(4, 64)).as_deref(), Some("ttyS0"));
        assert_eq!(tty_name(encode(5, 1)).as_deref(), Some("console"));
        assert_eq!(tty_name(encode(204, 64)).as_deref(), Some("204:64"));
    }

    #[test]
    fn real_stat_value() {
        // pts/0 as printed in /proc/PID/stat by a shell on a pseudo-terminal.
        assert_eq!(tty_name(34816).as_deref(), Some("pts/0"));
    }
}
