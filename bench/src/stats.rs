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

pub fn print(rows: &[Row]) {
    println!("| area | figure | value | ceiling (same run) | ratio |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} | {} | {} |", r.area, r.figure, r.value, r.ceiling, r.ratio);
    }
}
