//! Percentiles and the results table.

use std::time::Duration;

pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// One line of the results table.
pub struct Row {
    pub area: &'static str,
    pub figure: String,
    pub value: String,
    pub ceiling: String,
    pub ratio: String,
}

pub fn row(
    area: &'static str,
    figure: impl Into<String>,
    value: impl Into<String>,
    ceiling: impl Into<String>,
    ratio: impl Into<String>,
) -> Row {
    Row { area, figure: figure.into(), value: value.into(), ceiling: ceiling.into(), ratio: ratio.into() }
}

pub fn ratio(value: f64, ceiling: f64) -> String {
    if ceiling > 0.0 { format!("{:.0}%", 100.0 * value / ceiling) } else { "-".into() }
}

/// The median and the range of repeated readings of one figure.
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `readings` must not be empty. The median of an even count is the upper middle one.
    pub fn of(mut readings: Vec<f64>) -> Self {
        readings.sort_by(f64::total_cmp);
        Self { median: readings[readings.len() / 2], min: readings[0], max: readings[readings.len() - 1] }
    }
}

/// How the ratios of a pairs section are printed.
pub enum Unit {
    Percent,
    Times,
}

/// The closing row of a pairs section: the median and range of `ratios`, and whether the median
/// reaches `target`.
pub fn median_row(area: &'static str, what: &str, ratios: Vec<f64>, unit: Unit, target: f64) -> Row {
    let pairs = ratios.len();
    let s = Spread::of(ratios);
    let (value, target_text) = match unit {
        Unit::Percent => (
            format!("{:.0}% ({:.0}–{:.0}%)", 100.0 * s.median, 100.0 * s.min, 100.0 * s.max),
            format!("target ≥ {:.0}%", 100.0 * target),
        ),
        Unit::Times => (format!("{:.2}× ({:.2}–{:.2}×)", s.median, s.min, s.max), format!("target ≥ {target}×")),
    };
    let met = if s.median >= target { "✓" } else { "✗" };
    row(area, format!("{what} over {pairs} pairs: median (min–max)"), value, target_text, met)
}

pub fn print(rows: &[Row]) {
    println!("| area | figure | value | ceiling (same run) | ratio |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} | {} | {} |", r.area, r.figure, r.value, r.ceiling, r.ratio);
    }
}
