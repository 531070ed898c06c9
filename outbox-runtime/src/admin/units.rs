//! Durations as operators read and type them (the command line and the console).

use std::time::Duration;

/// Seconds as a short age: `45s`, `3m12s`, `2h05m`, `3d04h`; `-` for none.
pub fn age(secs: f64) -> String {
    if secs <= 0.0 {
        return "-".into();
    }
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A duration as an operator types it: a number and a unit, `90s`, `15m`, `2h`, `7d`
/// (or plain seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().map_err(|_| {
        format!("`{s}` is not a duration: write a number and a unit, e.g. 90s, 15m, 2h, 7d")
    })?;
    let unit_secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{s}`: the unit is one of s, m, h, d")),
    };
    Ok(Duration::from_secs(n.saturating_mul(unit_secs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("1w").is_err() && parse_duration("h").is_err());
        assert_eq!(age(0.0), "-");
        assert_eq!(age(192.0), "3m12s");
        assert_eq!(age(7500.0), "2h05m");
        assert_eq!(age(273_600.0), "3d04h");
    }
}
