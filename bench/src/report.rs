//! Medians, aligned tables and ratio lines.

/// The median of `values` (the mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::min)
}

pub fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::max)
}

/// A table printed with its columns aligned: the first `left` to the left (text), the others
/// to the right (numbers).
pub struct Table {
    left: usize,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(left: usize, header: &[&str]) -> Self {
        Self {
            left,
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let width: Vec<usize> = (0..columns)
            .map(|c| {
                let cell = |r: &Vec<String>| r.get(c).map_or(0, |s| s.chars().count());
                self.rows.iter().map(cell).max().unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(c, s)| match c < self.left {
                    true => format!("{s:<w$}", w = width[c]),
                    false => format!("{s:>w$}", w = width[c]),
                })
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

/// `RATIO <label>: <num/den> (target <= T: met|NOT met)`; a ratio that rounds to its target
/// shows a third decimal, so that the verdict can be seen.
pub fn ratio(label: &str, num: f64, den: f64, target: Option<f64>) -> String {
    let r = num / den;
    match target {
        Some(t) => {
            let shown = match format!("{r:.2}") == format!("{t:.2}") && r != t {
                true => format!("{r:.3}"),
                false => format!("{r:.2}"),
            };
            format!(
                "RATIO {label}: {shown} (target <= {t:.2}: {})",
                if r <= t { "met" } else { "NOT met" }
            )
        }
        None => format!("RATIO {label}: {r:.2}"),
    }
}

/// Seconds with millisecond precision.
pub fn secs(s: f64) -> String {
    format!("{s:.3}")
}

/// KiB as MiB with one decimal.
pub fn mib(kib: f64) -> String {
    format!("{:.1}", kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(min(&[2.0, 1.0]), 1.0);
        assert_eq!(max(&[2.0, 1.0]), 2.0);
    }

    #[test]
    fn tables_align_and_ratios_judge() {
        let mut t = Table::new(1, &["name", "s"]);
        t.row(vec!["podsnap".into(), "1.5".into()]);
        assert_eq!(t.render(), "name       s\npodsnap  1.5\n");
        assert_eq!(
            ratio("a/b", 1.0, 2.0, Some(0.5)),
            "RATIO a/b: 0.50 (target <= 0.50: met)"
        );
        assert_eq!(
            ratio("a/b", 3.0, 2.0, Some(1.2)),
            "RATIO a/b: 1.50 (target <= 1.20: NOT met)"
        );
        assert_eq!(
            ratio("a/b", 1.561, 2.218, Some(0.7)),
            "RATIO a/b: 0.704 (target <= 0.70: NOT met)"
        );
    }
}
