//! Waiting for a condition of the node with a generous deadline: liveness, never speed.

use std::fmt::Display;
use std::thread;
use std::time::{Duration, Instant};

/// How often a condition is probed.
const INTERVAL: Duration = Duration::from_millis(100);

/// Probes until `probe` returns `Ok`, and returns its value; panics after `timeout` with
/// `what` and the last `Err` (which should say what was seen instead).
pub fn wait_for<T>(
    what: impl Display,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => thread::sleep(INTERVAL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_the_condition_holds() {
        let mut n = 0;
        let got = wait_for("n to reach 3", Duration::from_secs(5), || {
            n += 1;
            if n >= 3 { Ok(n) } else { Err(format!("n={n}")) }
        });
        assert_eq!(got, 3);
    }

    #[test]
    #[should_panic(expected = "waiting for the impossible; last seen: still no")]
    fn panics_with_the_last_observation() {
        wait_for("the impossible", Duration::from_millis(200), || {
            Err::<(), _>("still no".to_string())
        });
    }
}
