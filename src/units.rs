//! Byte quantities as people write them: `500Mi`, `10Gi`, `1G`, `4096`.

/// Parses a size with an optional binary (`Ki`..`Ti`) or decimal (`K`/`k`..`T`) suffix.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let not_a_size = || format!("{text:?} is not a size (examples: 4096, 500Mi, 1.5Gi, 10G, 1e9)");
    // A Kubernetes quantity: digits, an optional fraction, then an exponent or a suffix.
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') || fraction.len() > 9 {
        return Err(not_a_size());
    }
    let scale = 10u128.pow(fraction.len() as u32);
    let mantissa: u128 = format!("{whole}{fraction}")
        .parse()
        .map_err(|_| not_a_size())?;
    let multiplier: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        exponent if exponent.starts_with(['e', 'E']) => {
            let power: u32 = exponent[1..].parse().map_err(|_| not_a_size())?;
            10u128
                .checked_pow(power)
                .ok_or_else(|| format!("{text:?} is too large"))?
        }
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit {suffix:?} (use Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, \
                 T, P, E or an exponent like 1e9)"
            ));
        }
    };
    // Rounded up: a fraction of a byte asks for one more.
    let bytes = mantissa
        .checked_mul(multiplier)
        .map(|b| b.div_ceil(scale))
        .ok_or_else(|| format!("{text:?} is too large"))?;
    u64::try_from(bytes).map_err(|_| format!("{text:?} is too large"))
}

/// Formats bytes with the largest binary unit that keeps one decimal, for people.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        let cases: &[(&str, Option<u64>)] = &[
            ("4096", Some(4096)),
            ("1Ki", Some(1024)),
            ("500Mi", Some(500 << 20)),
            ("10Gi", Some(10 << 30)),
            ("2G", Some(2_000_000_000)),
            ("1.5Gi", Some(3 << 29)),
            ("0.5Mi", Some(1 << 19)),
            ("1e9", Some(1_000_000_000)),
            ("1E3", Some(1_000)),
            ("2E", Some(2_000_000_000_000_000_000)),
            ("1Pi", Some(1 << 50)),
            ("1.0000001", Some(2)),
            (".5Ki", Some(512)),
            (".", None),
            ("1.2.3Gi", None),
            ("1e", None),
            ("16Ei", None),
            ("", None),
            ("-1", None),
            ("1Qi", None),
            ("99999999999999999999", None),
            ("20000000Ti", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_bytes(text).ok(), *want, "{text:?}");
        }
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10 << 30), "10.0 GiB");
    }
}
