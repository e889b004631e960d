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
/// nothing, so a device that only slows the group down gets none. The search asks for
/// the same (device, strip) many times: memoize `cost` when it is dear.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_give_proportional_strips() {
        let strips = strips_from_weights(10, &[3.0, 3.0, 2.0, 2.0]);
        assert_eq!(
            strips,
            vec![
                Rows::new(0, 3),
                Rows::new(3, 6),
                Rows::new(6, 8),
                Rows::new(8, 10)
            ]
        );
        // 7 rows over 3 equal devices: the remainder row goes to the first device.
        let strips = strips_from_weights(7, &[1.0, 1.0, 1.0]);
        assert_eq!(
            strips,
            vec![Rows::new(0, 3), Rows::new(3, 5), Rows::new(5, 7)]
        );
    }

    #[test]
    fn more_devices_than_rows_leaves_empty_strips() {
        let strips = strips_from_weights(2, &[1.0; 4]);
        assert_eq!(
            strips.iter().map(|r| r.len()).collect::<Vec<_>>(),
            vec![1, 1, 0, 0]
        );
        assert_eq!(strips.last().unwrap().end, 2);
    }

    #[test]
    fn rebalance_minimises_the_slowest_device() {
        // Device 0 is twice as fast: 9 rows split 6/3.
        let speeds = [2.0, 1.0];
        let strips = rebalance(9, 2, |d, r| r.len() as f64 / speeds[d]);
        assert_eq!(strips, vec![Rows::new(0, 6), Rows::new(6, 9)]);
        // A fixed cost per strip (a transfer) makes a slow device worthless: it gets nothing.
        let strips = rebalance(4, 2, |d, r| {
            if d == 1 {
                100.0 + r.len() as f64
            } else {
                r.len() as f64
            }
        });
        assert_eq!(strips, vec![Rows::new(0, 4), Rows::new(4, 4)]);
    }
}
