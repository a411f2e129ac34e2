//! The two parts of systemd's notify protocol the daemon uses, without a library: `READY=1`
//! once the station runs (the unit is `Type=notify`), and `WATCHDOG=1` pings while its stages
//! make progress (`WatchdogSec=` in the unit: systemd restarts a daemon that stops pinging).
//! Outside systemd (no `NOTIFY_SOCKET`) both are no-ops.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends `state` (e.g. `"READY=1"`) to the service manager; false when there is none or the
/// message could not be sent.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let sent = match bytes.split_first() {
        // An abstract socket: "@name".
        Some((b'@', name)) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
        }
        _ => socket.send_to(state.as_bytes(), &path),
    };
    sent.is_ok()
}

/// How often systemd expects a ping (`WATCHDOG_USEC`, for this process), if it does.
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}
