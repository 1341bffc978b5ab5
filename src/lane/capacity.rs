//! Turns a CSI capacity range into a volume size.
//!
//! Rules: negative sizes and `limit < required` are invalid arguments; a size larger than the
//! lane can ever hold is out of range; sizes round up to 4 KiB when the limit allows it. No
//! arithmetic overflows: every size stays within `i64::MAX`, the largest the wire can carry, so
//! a request near 2^63 gets OUT_OF_RANGE or a valid size, never a negative one.

use super::Error;

const BLOCK: u64 = 4096;
/// The largest size a CSI message can carry (`int64` fields).
const WIRE_MAX: u64 = i64::MAX as u64;

/// A size as the wire carries it: sizes beyond `i64::MAX` are reported as `i64::MAX`.
pub fn to_wire(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// A CapacityRange as received: zero means "not said".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Range {
    pub required: i64,
    pub limit: i64,
}

impl Range {
    fn checked(self) -> Result<(u64, u64), Error> {
        if self.required < 0 || self.limit < 0 {
            return Err(Error::Capacity(
                "required_bytes and limit_bytes must not be negative".into(),
            ));
        }
        let (required, limit) = (self.required as u64, self.limit as u64);
        if limit > 0 && required > limit {
            return Err(Error::Capacity(format!(
                "required_bytes ({required}) is larger than limit_bytes ({limit})"
            )));
        }
        Ok((required, limit))
    }

    /// The size to provision: `required` (or `default` when unset, capped by `limit`), rounded
    /// up to 4 KiB where the limit allows, and at most `max`.
    pub fn resolve(self, default: u64, max: u64) -> Result<u64, Error> {
        let (required, limit) = self.checked()?;
        let max = max.min(WIRE_MAX);
        let mut size = match (required, limit) {
            (0, 0) => default,
            (0, limit) => default.min(limit),
            (required, _) => required,
        };
        let rounded = size.div_ceil(BLOCK).saturating_mul(BLOCK);
        if (limit == 0 || rounded <= limit) && rounded <= max {
            size = rounded;
        }
        if size > max {
            return Err(Error::CapacityOutOfRange {
                requested: size,
                max,
            });
        }
        Ok(size)
    }

    /// What an existing volume of `current` bytes grows to for this (expansion) range:
    /// `None` when it already satisfies the range or the range asks for less (volumes never
    /// shrink). `max`, the largest the lane can hold, is asked only when it must grow.
    pub fn grown(
        self,
        current: u64,
        max: impl FnOnce() -> Result<u64, Error>,
    ) -> Result<Option<u64>, Error> {
        if self.required <= 0 && self.limit <= 0 {
            return Err(Error::Capacity(
                "capacity_range must set required_bytes or limit_bytes".into(),
            ));
        }
        if self.admits(current)? || (self.required as u64) < current {
            return Ok(None);
        }
        self.resolve(current, max()?).map(Some)
    }

    /// True when an existing volume of `size` bytes satisfies this range.
    pub fn admits(self, size: u64) -> Result<bool, Error> {
        let (required, limit) = self.checked()?;
        Ok(size >= required && (limit == 0 || size <= limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    const GI: i64 = 1 << 30;

    #[test]
    fn resolves_ranges() {
        struct Case {
            desc: &'static str,
            range: Range,
            want: Result<u64, Kind>,
        }
        let r = |required, limit| Range { required, limit };
        let cases = [
            Case {
                desc: "unset uses default",
                range: r(0, 0),
                want: Ok(GI as u64),
            },
            Case {
                desc: "limit caps default",
                range: r(0, GI / 2),
                want: Ok((GI / 2) as u64),
            },
            Case {
                desc: "required wins",
                range: r(2 * GI, 0),
                want: Ok(2 * GI as u64),
            },
            Case {
                desc: "rounds up",
                range: r(1000, 0),
                want: Ok(4096),
            },
            Case {
                desc: "exact tiny",
                range: r(1000, 1000),
                want: Ok(1000),
            },
            Case {
                desc: "negative",
                range: r(-1, 0),
                want: Err(Kind::InvalidArgument),
            },
            Case {
                desc: "negative limit",
                range: r(0, -5),
                want: Err(Kind::InvalidArgument),
            },
            Case {
                desc: "limit below required",
                range: r(10, 5),
                want: Err(Kind::InvalidArgument),
            },
            Case {
                desc: "absurd",
                range: r(i64::MAX, 0),
                want: Err(Kind::OutOfRange),
            },
        ];
        // Against a lane that could hold anything: never more than i64::MAX, never negative.
        for (range, want) in [
            (r(i64::MAX, 0), Ok(i64::MAX as u64)),
            (r(i64::MAX - 10, 0), Ok(i64::MAX as u64 - 10)),
            (r(0, i64::MAX), Ok(GI as u64)),
            (r(i64::MAX, i64::MAX), Ok(i64::MAX as u64)),
        ] {
            let got = range.resolve(GI as u64, u64::MAX).map_err(|e| e.kind());
            assert_eq!(got, want, "{range:?}");
            assert!(to_wire(got.unwrap()) > 0);
        }
        assert_eq!(to_wire(u64::MAX), i64::MAX);
        for case in cases {
            let got = case
                .range
                .resolve(GI as u64, 100 * GI as u64)
                .map_err(|e| e.kind());
            assert_eq!(got, case.want, "{}", case.desc);
        }
    }

    #[test]
    fn admits_existing_sizes() {
        let range = Range {
            required: 100,
            limit: 200,
        };
        assert!(range.admits(150).unwrap());
        assert!(!range.admits(50).unwrap());
        assert!(!range.admits(300).unwrap());
        assert!(Range::default().admits(1).unwrap());
    }
}
