//! Cutting a group's output rows into per-device strips.

use legion_ir::Rows;

/// Integer strips proportional to `weights` (largest remainder), in device order,
/// summing to `height`. A device whose share rounds to zero gets an empty strip.
pub fn strips_from_weights(height: usize, weights: &[f64]) -> Vec<Rows> {
    let total: f64 = weights.iter().map(|w| w.max(0.0)).sum();
    if weights.is_empty() || total <= 0.0 {
        return weights.iter().map(|_| Rows::default()).collect();
    }
    let exact: Vec<f64> = weights
        .iter()
        .map(|w| w.max(0.0) / total * height as f64)
        .collect();
    let mut counts: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    // Largest fractional part first; ties go to the earlier device.
    order.sort_by(|&a, &b| {
        (exact[b] - exact[b].floor())
            .total_cmp(&(exact[a] - exact[a].floor()))
            .then(a.cmp(&b))
    });
    let short = height - counts.iter().sum::<usize>();
    for &d in order.iter().take(short) {
        counts[d] += 1;
    }
    cut(&counts)
}

/// Consecutive strips of the given sizes starting at row 0.
pub fn cut(counts: &[usize]) -> Vec<Rows> {
    let mut start = 0;
    counts
        .iter()
        .map(|&n| {
            let r = Rows::new(start, start + n);
            start += n;
            r
        })
        .collect()
}

/// Min-max shares: strips for `devices` devices over `height` rows that minimise the
/// largest `cost(device, strip)`. `cost` must not decrease when a strip grows; it may
/// depend on where the strip lies (edge strips have smaller halos). An empty strip costs
/// nothing, so a device that only slows the group down gets none.
pub fn rebalance(height: usize, devices: usize, cost: impl Fn(usize, Rows) -> f64) -> Vec<Rows> {
    // Greedy fill for a time budget: each device in order takes as many rows as fit.
    let fill = |budget: f64| -> Option<Vec<usize>> {
        let mut start = 0;
        let mut counts = vec![0; devices];
        for (d, count) in counts.iter_mut().enumerate() {
            let (mut lo, mut hi) = (0, height - start);
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if cost(d, Rows::new(start, start + mid)) <= budget {
                    lo = mid
                } else {
                    hi = mid - 1
                }
            }
            *count = lo;
            start += lo;
        }
        (start == height).then_some(counts)
    };
    let worst = |counts: &[usize]| {
        cut(counts)
            .iter()
            .enumerate()
            .map(|(d, r)| if r.is_empty() { 0.0 } else { cost(d, *r) })
            .fold(0.0, f64::max)
    };
    let even = strips_from_weights(height, &vec![1.0; devices]);
    let mut best: Vec<usize> = even.iter().map(|r| r.len()).collect();
    let (mut lo, mut hi) = (0.0, worst(&best));
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        match fill(mid) {
            Some(counts) => {
                hi = worst(&counts);
                best = counts;
            }
            None => lo = mid,
        }
        if hi - lo <= hi * 1e-9 {
            break;
        }
    }
    cut(&best)
}
