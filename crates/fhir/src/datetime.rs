//! FHIR `date`, `dateTime` and `instant` values as UTC ranges, and the server's instant format.
//!
//! A FHIR date/time value denotes the whole period its precision covers: `2024` is all of 2024,
//! `2024-03-01T10:00+01:00` is that minute. Searching compares these ranges, so parsing yields a half-open UTC
//! range `[start, end)`.

use time::{Date, Duration, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// The UTC period a FHIR date/time value covers: `start` inclusive, `end` exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DateRange {
    pub start: OffsetDateTime,
    pub end: OffsetDateTime,
}

impl DateRange {
    /// True when `instant` falls inside the range.
    pub fn contains(&self, instant: OffsetDateTime) -> bool {
        self.start <= instant && instant < self.end
    }

    /// True when the two ranges share at least one instant.
    pub fn overlaps(&self, other: &DateRange) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// Why a string is not a FHIR date/time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid date/time '{input}': {reason}")]
pub struct DateTimeError {
    /// The offending input, truncated to 64 characters.
    pub input: String,
    pub reason: &'static str,
}

/// Parses `YYYY`, `YYYY-MM`, `YYYY-MM-DD`, `YYYY-MM-DDThh:mm(:ss(.f+)?)?(Z|±hh:mm)` into the UTC range it covers.
///
/// The range's width is the value's precision (a year, month, day, minute, second or the given fraction of a
/// second). A time without a zone is read as UTC (FHIR requires a zone on stored values; search values may
/// omit it and the server's zone is UTC). A leap second `:60` is read as `:59`.
pub fn parse_fhir_datetime(input: &str) -> Result<DateRange, DateTimeError> {
    let fail = |reason| DateTimeError { input: input.chars().take(64).collect(), reason };
    let mut cursor = Cursor { bytes: input.as_bytes(), pos: 0 };

    let year = cursor.digits(4).ok_or_else(|| fail("expected a four digit year"))?;
    let year = i32::try_from(year).map_err(|_| fail("year out of range"))?;
    if cursor.done() {
        let start = date(year, 1, 1).ok_or_else(|| fail("year out of range"))?;
        let end = date(year + 1, 1, 1).ok_or_else(|| fail("year out of range"))?;
        return Ok(day_range(start, end));
    }
    cursor.expect(b'-').ok_or_else(|| fail("expected '-' after the year"))?;
    let month = cursor.digits(2).ok_or_else(|| fail("expected a two digit month"))?;
    let month =
        u8::try_from(month).ok().and_then(|m| Month::try_from(m).ok()).ok_or_else(|| fail("month out of range"))?;
    if cursor.done() {
        let start = Date::from_calendar_date(year, month, 1).map_err(|_| fail("year out of range"))?;
        let end = if month == Month::December { date(year + 1, 1, 1) } else { date(year, month as u8 + 1, 1) };
        return Ok(day_range(start, end.ok_or_else(|| fail("year out of range"))?));
    }
    cursor.expect(b'-').ok_or_else(|| fail("expected '-' after the month"))?;
    let day = cursor.digits(2).ok_or_else(|| fail("expected a two digit day"))?;
    let day = u8::try_from(day).map_err(|_| fail("day out of range"))?;
    let day = Date::from_calendar_date(year, month, day).map_err(|_| fail("no such day in that month"))?;
    if cursor.done() {
        let end = day.next_day().ok_or_else(|| fail("year out of range"))?;
        return Ok(day_range(day, end));
    }

    cursor.expect(b'T').ok_or_else(|| fail("expected 'T' after the date"))?;
    let hour = cursor.digits(2).ok_or_else(|| fail("expected a two digit hour"))?;
    cursor.expect(b':').ok_or_else(|| fail("expected ':' after the hour"))?;
    let minute = cursor.digits(2).ok_or_else(|| fail("expected two digit minutes"))?;
    let mut second = 0;
    let mut nanos = 0;
    let mut width = Duration::MINUTE;
    if cursor.expect(b':').is_some() {
        second = cursor.digits(2).ok_or_else(|| fail("expected two digit seconds"))?;
        width = Duration::SECOND;
        if second == 60 {
            second = 59;
        }
        if cursor.expect(b'.').is_some() {
            let fraction = cursor.take_while(|b| b.is_ascii_digit());
            if fraction.is_empty() {
                return Err(fail("expected digits after '.'"));
            }
            let mut scale = 1_000_000_000_u32;
            for digit in fraction.iter().take(9) {
                scale /= 10;
                nanos += u32::from(digit - b'0') * scale;
            }
            width = Duration::nanoseconds(i64::from(scale.max(1)));
        }
    }
    let hour = u8::try_from(hour).map_err(|_| fail("hour out of range"))?;
    let minute = u8::try_from(minute).map_err(|_| fail("minutes out of range"))?;
    let second = u8::try_from(second).map_err(|_| fail("seconds out of range"))?;
    let time = Time::from_hms_nano(hour, minute, second, nanos).map_err(|_| fail("time of day out of range"))?;

    let offset = if cursor.done() || cursor.expect(b'Z').is_some() {
        UtcOffset::UTC
    } else {
        let sign: i8 = match cursor.next() {
            Some(b'+') => 1,
            Some(b'-') => -1,
            _ => return Err(fail("expected 'Z' or a '+hh:mm'/'-hh:mm' zone offset")),
        };
        let hours = cursor.digits(2).ok_or_else(|| fail("expected two digit zone hours"))?;
        cursor.expect(b':').ok_or_else(|| fail("expected ':' in the zone offset"))?;
        let minutes = cursor.digits(2).ok_or_else(|| fail("expected two digit zone minutes"))?;
        if hours > 14 || minutes > 59 || (hours == 14 && minutes > 0) {
            return Err(fail("zone offset out of range"));
        }
        let hours = i8::try_from(hours).map_err(|_| fail("zone offset out of range"))?;
        let minutes = i8::try_from(minutes).map_err(|_| fail("zone offset out of range"))?;
        UtcOffset::from_hms(sign * hours, sign * minutes, 0).map_err(|_| fail("zone offset out of range"))?
    };
    if !cursor.done() {
        return Err(fail("unexpected characters after the value"));
    }
    let start = PrimitiveDateTime::new(day, time).assume_offset(offset).to_offset(UtcOffset::UTC);
    let end = start.checked_add(width).ok_or_else(|| fail("year out of range"))?;
    Ok(DateRange { start, end })
}

/// Formats an instant the way the server writes `meta.lastUpdated`: UTC, exactly three fractional digits
/// (truncated), e.g. `2026-11-28T17:03:39.123Z`.
pub fn format_instant(instant: OffsetDateTime) -> String {
    let utc = instant.to_offset(UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        utc.year(),
        u8::from(utc.month()),
        utc.day(),
        utc.hour(),
        utc.minute(),
        utc.second(),
        utc.millisecond()
    )
}

fn date(year: i32, month: u8, day: u8) -> Option<Date> {
    Date::from_calendar_date(year, Month::try_from(month).ok()?, day).ok()
}

fn day_range(start: Date, end: Date) -> DateRange {
    DateRange { start: start.midnight().assume_utc(), end: end.midnight().assume_utc() }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn done(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = *self.bytes.get(self.pos)?;
        self.pos += 1;
        Some(byte)
    }

    fn expect(&mut self, wanted: u8) -> Option<()> {
        (self.bytes.get(self.pos) == Some(&wanted)).then(|| self.pos += 1)
    }

    fn take_while(&mut self, pred: impl Fn(u8) -> bool) -> &'a [u8] {
        let start = self.pos;
        while self.bytes.get(self.pos).is_some_and(|b| pred(*b)) {
            self.pos += 1;
        }
        self.bytes.get(start..self.pos).unwrap_or_default()
    }

    /// Exactly `count` ASCII digits as a number.
    fn digits(&mut self, count: usize) -> Option<u32> {
        let digits = self.bytes.get(self.pos..self.pos + count)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        self.pos += count;
        Some(digits.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn range(input: &str) -> (OffsetDateTime, OffsetDateTime) {
        let range = parse_fhir_datetime(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        (range.start, range.end)
    }

    #[test]
    fn partial_dates_cover_their_period() {
        assert_eq!(range("2024"), (datetime!(2024-01-01 0:00 UTC), datetime!(2025-01-01 0:00 UTC)));
        assert_eq!(range("2024-02"), (datetime!(2024-02-01 0:00 UTC), datetime!(2024-03-01 0:00 UTC)));
        assert_eq!(range("2024-12"), (datetime!(2024-12-01 0:00 UTC), datetime!(2025-01-01 0:00 UTC)));
        assert_eq!(range("2024-02-29"), (datetime!(2024-02-29 0:00 UTC), datetime!(2024-03-01 0:00 UTC)));
    }

    #[test]
    fn date_times_convert_to_utc_with_their_precision() {
        assert_eq!(
            range("2024-03-01T10:15:30Z"),
            (datetime!(2024-03-01 10:15:30 UTC), datetime!(2024-03-01 10:15:31 UTC))
        );
        assert_eq!(
            range("2024-03-01T10:15:30.25+02:00"),
            (datetime!(2024-03-01 08:15:30.25 UTC), datetime!(2024-03-01 08:15:30.26 UTC))
        );
        assert_eq!(range("2024-03-01T00:15-05:30"), (datetime!(2024-03-01 05:45 UTC), datetime!(2024-03-01 05:46 UTC)));
        assert_eq!(range("2024-03-01T10:15:30.123456789123Z").0, datetime!(2024-03-01 10:15:30.123456789 UTC));
        assert_eq!(range("2024-03-01T10:15:30").0, datetime!(2024-03-01 10:15:30 UTC));
        assert_eq!(range("2016-12-31T23:59:60Z").0, datetime!(2016-12-31 23:59:59 UTC));
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "24",
            "2024-1",
            "2024-13",
            "2024-02-30",
            "2024-01-01T",
            "2024-01-01T25:00Z",
            "2024-01-01T10Z",
            "2024-01-01T10:00:00+15:00",
            "2024-01-01T10:00:00.Z",
            "2024-01-01T10:00:00Zx",
            "2024-01-01 10:00",
            "２０２４",
            "2024-01-01T10:00:00+0100",
        ] {
            assert!(parse_fhir_datetime(bad).is_err(), "{bad:?} should not parse");
        }
        let error = parse_fhir_datetime("2024-13").expect_err("month 13");
        assert_eq!(error.to_string(), "invalid date/time '2024-13': month out of range");
    }

    #[test]
    fn ranges_compare() {
        let year = parse_fhir_datetime("2024").expect("valid");
        let day = parse_fhir_datetime("2024-06-01").expect("valid");
        assert!(year.overlaps(&day) && day.overlaps(&year));
        assert!(year.contains(datetime!(2024-12-31 23:59:59.999 UTC)));
        assert!(!year.contains(datetime!(2025-01-01 0:00 UTC)));
        assert!(!day.overlaps(&parse_fhir_datetime("2024-06-02").expect("valid")));
    }

    #[test]
    fn formats_instants_in_utc_with_milliseconds() {
        assert_eq!(format_instant(datetime!(2026-11-28 17:03:39.123456 UTC)), "2026-11-28T17:03:39.123Z");
        assert_eq!(format_instant(datetime!(2026-11-28 18:03:39 +01:00)), "2026-11-28T17:03:39.000Z");
        assert_eq!(format_instant(datetime!(0987-01-02 03:04:05.9999 UTC)), "0987-01-02T03:04:05.999Z");
        let formatted = format_instant(datetime!(2026-11-28 17:03:39.123 UTC));
        assert_eq!(parse_fhir_datetime(&formatted).map(|r| r.start), Ok(datetime!(2026-11-28 17:03:39.123 UTC)));
    }
}
