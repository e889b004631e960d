//! The network model the emulator and the cost model share: a switched star. Each
//! device has its own link to the switch, so device links do not contend. Through the
//! hub ([`step_timeline`]) every strip also crosses the coordinator's link, which the
//! transfers in flight share max-min fairly (each capped by its device's link); when
//! boards pass rows to each other ([`program_timeline`]) a transfer uses only its two
//! ends' links. Latency is paid once per transfer.

use crate::{Link, Party, Program, Step};
use legion_ir::{Rows, TensorRef};
use std::collections::HashMap;

/// A transfer between the coordinator and one device, in one direction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Flow {
    /// When it starts, µs.
    pub start_us: f64,
    /// Bytes moved.
    pub bytes: u64,
    /// The device's link.
    pub link: Link,
}

/// When each flow's last byte arrives, µs, for flows in one direction over a
/// coordinator link of `hub_mbps`.
///
/// A flow alone arrives at `start + latency + bytes / min(device, hub bandwidth)`.
pub fn arrival_times(flows: &[Flow], hub_mbps: f64) -> Vec<f64> {
    // Bits left per flow; bandwidths in Mbit/s are bits per µs.
    let mut left: Vec<f64> = flows.iter().map(|f| f.bytes as f64 * 8.0).collect();
    let mut done: Vec<Option<f64>> = vec![None; flows.len()];
    let mut now = flows
        .iter()
        .map(|f| f.start_us)
        .fold(f64::INFINITY, f64::min);
    while done.iter().any(Option::is_none) {
        let active: Vec<usize> = (0..flows.len())
            .filter(|&i| done[i].is_none() && flows[i].start_us <= now)
            .collect();
        for &i in &active {
            if left[i] <= 0.0 {
                done[i] = Some(now);
            }
        }
        let active: Vec<usize> = active.into_iter().filter(|&i| done[i].is_none()).collect();
        let rates = fair_rates(
            &active
                .iter()
                .map(|&i| flows[i].link.mbps)
                .collect::<Vec<_>>(),
            hub_mbps,
        );
        let next_start = flows
            .iter()
            .enumerate()
            .filter(|(i, f)| done[*i].is_none() && f.start_us > now)
            .map(|(_, f)| f.start_us)
            .fold(f64::INFINITY, f64::min);
        let next_finish = active
            .iter()
            .zip(&rates)
            .map(|(&i, &r)| now + left[i] / r)
            .fold(f64::INFINITY, f64::min);
        let next = next_start.min(next_finish);
        if !next.is_finite() {
            break;
        }
        for (&i, &r) in active.iter().zip(&rates) {
            left[i] -= r * (next - now);
            // What is left is below one bit of rounding: the flow is done.
            if left[i] < 1e-6 {
                left[i] = 0.0;
                done[i] = Some(next);
            }
        }
        now = next;
    }
    flows
        .iter()
        .zip(done)
        .map(|(f, d)| d.unwrap_or(f.start_us) + f.link.latency_ms * 1e3)
        .collect()
}

/// One device's part of a step through the coordinator: its input strips in, its
/// compute, its output strips back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepPart {
    /// Bytes the coordinator sends it.
    pub bytes_in: u64,
    /// The link they cross to the device.
    pub link_in: Link,
    /// Its compute time, µs.
    pub compute_us: f64,
    /// Bytes it sends back.
    pub bytes_out: u64,
    /// The link they cross to the coordinator.
    pub link_out: Link,
}

/// When one device's part of a step reaches each point, µs from the step's start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepTimes {
    /// Its input strips have all arrived.
    pub inputs_in_us: f64,
    /// It has computed its tile.
    pub computed_us: f64,
    /// Its output strips are all back at the coordinator.
    pub done_us: f64,
}

/// The timeline of one step, the one model the cost pass predicts with and the
/// emulated coordinator times with: every scatter starts at time 0 and they share the
/// coordinator's link; each device computes once its strips are in; each gather
/// starts when its device is done computing, and they share the link again.
pub fn step_timeline(parts: &[StepPart], hub_mbps: f64) -> Vec<StepTimes> {
    let scatter: Vec<Flow> = parts
        .iter()
        .map(|p| Flow {
            start_us: 0.0,
            bytes: p.bytes_in,
            link: p.link_in,
        })
        .collect();
    let inputs_in = arrival_times(&scatter, hub_mbps);
    let gather: Vec<Flow> = parts
        .iter()
        .zip(&inputs_in)
        .map(|(p, arrived)| Flow {
            start_us: arrived + p.compute_us,
            bytes: p.bytes_out,
            link: p.link_out,
        })
        .collect();
    let done = arrival_times(&gather, hub_mbps);
    gather
        .iter()
        .zip(inputs_in.iter().zip(done))
        .map(|(g, (&inputs_in_us, done_us))| StepTimes {
            inputs_in_us,
            computed_us: g.start_us,
            done_us,
        })
        .collect()
}

/// One step of a party's program as the program timeline sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TimedStep {
    /// Computes for this long, µs.
    Run(f64),
    /// Sends message `id` of this many bytes to party `to`; the program goes on at once.
    Send {
        /// The message, shared with its receive.
        id: usize,
        /// Bytes.
        bytes: u64,
        /// The receiving party.
        to: usize,
    },
    /// Waits for message `id`.
    Receive(usize),
    /// Nothing to time (a drop).
    Nothing,
}

/// The timeline of programs running at once, when boards pass rows to each other:
/// every party has a full-duplex link to the switch; a transfer uses its sender's
/// uplink and its receiver's downlink (transfers between other pairs do not meet),
/// moves at the slower of the two and arrives after the larger latency of the two.
/// Transfers on one link go first come, first served, each holding the link for its
/// bits at the link's own rate: a 1 Gbit/s coordinator feeds ten 100 Mbit/s boards at
/// once, a board's sends to two others follow each other. `steps[p]` is
/// party `p`'s program and `links[p]` its link. Returns, per party and step, when the
/// step ends, µs from the start; `None` when some receive has no send.
pub fn program_timeline(steps: &[Vec<TimedStep>], links: &[Link]) -> Option<Vec<Vec<f64>>> {
    let party: Vec<usize> = (0..steps.len()).collect();
    threads_timeline(steps, &party, links)
}

/// [`program_timeline`] for several programs per party (`threads[t]` run by party
/// `party[t]`, e.g. one per frame of a stream): each thread goes on by itself, and a
/// party computes one run step at a time. A run step starts once its thread is there
/// and its party is free; of the run steps waiting for a party, the lowest thread
/// goes first (the oldest frame); a started run is never interrupted. Sends and
/// receives do not wait for the party. Returns, per thread and step, when the step
/// ends.
pub fn threads_timeline(
    threads: &[Vec<TimedStep>],
    party: &[usize],
    links: &[Link],
) -> Option<Vec<Vec<f64>>> {
    let parties = links.len();
    let mut now = vec![0.0f64; threads.len()];
    let mut pc = vec![0usize; threads.len()];
    let mut free = vec![0.0f64; parties];
    let mut up_free = vec![0.0f64; parties];
    let mut down_free = vec![0.0f64; parties];
    let mut arrival: HashMap<usize, f64> = HashMap::new();
    let mut ends: Vec<Vec<f64>> = threads.iter().map(|s| vec![0.0; s.len()]).collect();
    // The threads that may go on, and those waiting for a message not sent yet (only
    // the first are looked at: a long stream has few frames in flight).
    let mut ready: Vec<usize> = (0..threads.len())
        .filter(|&t| !threads[t].is_empty())
        .collect();
    let mut blocked: HashMap<usize, Vec<usize>> = HashMap::new();
    loop {
        // The thread that can go on earliest (the lowest of equals); a receive can once
        // its message is sent, a run once its party is free.
        let mut next: Option<(f64, usize)> = None;
        let mut k = 0;
        while k < ready.len() {
            let t = ready[k];
            let at = match threads[t][pc[t]] {
                TimedStep::Receive(id) => match arrival.get(&id) {
                    Some(&arrives) => now[t].max(arrives),
                    None => {
                        blocked.entry(id).or_default().push(ready.swap_remove(k));
                        continue;
                    }
                },
                TimedStep::Run(_) => now[t].max(free[party[t]]),
                _ => now[t],
            };
            if next.is_none_or(|(best, b)| at < best || (at == best && t < b)) {
                next = Some((at, t));
            }
            k += 1;
        }
        let Some((at, t)) = next else { break };
        let p = party[t];
        match threads[t][pc[t]] {
            TimedStep::Run(us) => {
                now[t] = at + us;
                free[p] = now[t];
            }
            TimedStep::Send { id, bytes, to } => {
                let (from, into) = (links[p], links[to]);
                let bits = bytes as f64 * 8.0;
                // Each link carries its capacity in bits: a transfer starts once both
                // ends have room, moves at the slower end's rate, and holds each end
                // for the time its bits take at that end's full rate (so a fast link
                // feeds several slow ones at once).
                let start = at.max(up_free[p]).max(down_free[to]);
                let end = start + bits / from.mbps.min(into.mbps);
                up_free[p] = at.max(up_free[p]) + bits / from.mbps;
                down_free[to] = start.max(down_free[to]) + bits / into.mbps;
                arrival.insert(id, end + from.latency_ms.max(into.latency_ms) * 1e3);
                ready.extend(blocked.remove(&id).unwrap_or_default());
                now[t] = at;
            }
            TimedStep::Receive(_) | TimedStep::Nothing => now[t] = at,
        }
        ends[t][pc[t]] = now[t];
        pc[t] += 1;
        if pc[t] == threads[t].len() {
            ready.retain(|&r| r != t);
        }
    }
    (0..threads.len())
        .all(|t| pc[t] == threads[t].len())
        .then_some(ends)
}

/// A candidate's programs on [`program_timeline`]: a run step takes `compute(party,
/// step)` µs, a transfer moves `bytes(tensor, rows, channels)`, each party `p` on `links[p]`
/// (`programs[p]`'s party). Returns, per party and step, when the step ends, µs from
/// the start; an error when a step names a party without a program or waits on rows no
/// program sends.
pub fn programs_timeline(
    programs: &[Program],
    links: &[Link],
    bytes: impl Fn(TensorRef, Rows, Option<Rows>) -> u64,
    compute: impl Fn(usize, usize) -> f64,
) -> Result<Vec<Vec<f64>>, String> {
    let mut ids = HashMap::new();
    let frame = timed_frame(programs, &bytes, &compute, 0, &mut ids)?;
    let steps: Vec<Vec<TimedStep>> = frame.iter().map(|t| t.steps.clone()).collect();
    let timed_ends = program_timeline(&steps, links)
        .ok_or_else(|| "the programs wait on rows no program sends".to_string())?;
    Ok(programs
        .iter()
        .zip(timed_ends.iter().zip(&frame))
        .map(|(program, (ends, timed))| {
            let mut by_step = vec![0.0f64; program.steps.len()];
            for (end, &k) in ends.iter().zip(&timed.origin) {
                by_step[k] = by_step[k].max(*end);
            }
            by_step
        })
        .collect())
}

/// One party's program of one frame as timed steps.
struct TimedProgram {
    steps: Vec<TimedStep>,
    /// The program step each timed step comes from.
    origin: Vec<usize>,
}

/// A message: frame, sender, receiver, tensor, rows, channels, and whether it is a
/// partial result of a reduction.
type MessageKey = (usize, usize, usize, TensorRef, Rows, Option<Rows>, bool);

/// Every party's program of frame `frame` as timed steps; messages get ids from `ids`,
/// unique per frame.
fn timed_frame(
    programs: &[Program],
    bytes: &impl Fn(TensorRef, Rows, Option<Rows>) -> u64,
    compute: &impl Fn(usize, usize) -> f64,
    frame: usize,
    ids: &mut HashMap<MessageKey, usize>,
) -> Result<Vec<TimedProgram>, String> {
    let index = |party: &Party| -> Result<usize, String> {
        programs
            .iter()
            .position(|p| &p.party == party)
            .ok_or_else(|| format!("a program moves rows with {party}, who has no program"))
    };
    let mut timed_programs = vec![];
    for (p, program) in programs.iter().enumerate() {
        let mut timed = vec![];
        let mut origin = vec![];
        for (k, step) in program.steps.iter().enumerate() {
            let mut id_of = |(from, to, tensor, rows, channels, partial)| {
                let next = ids.len();
                *ids.entry((frame, from, to, tensor, rows, channels, partial))
                    .or_insert(next)
            };
            let one_row = Rows::new(0, 1);
            if let Step::Combine { stage, parts } = step {
                let mut waits = 0;
                for from in parts {
                    let from = index(from)?;
                    if from != p {
                        let key = (from, p, TensorRef::Stage(*stage), one_row, None, true);
                        timed.push(TimedStep::Receive(id_of(key)));
                        origin.push(k);
                        waits += 1;
                    }
                }
                if waits == 0 {
                    timed.push(TimedStep::Nothing);
                    origin.push(k);
                }
                continue;
            }
            origin.push(k);
            timed.push(match step {
                Step::Run { .. } => TimedStep::Run(compute(p, k)),
                Step::Send {
                    tensor,
                    rows,
                    channels,
                    to,
                } => {
                    let to = index(to)?;
                    TimedStep::Send {
                        id: id_of((p, to, *tensor, *rows, *channels, false)),
                        bytes: bytes(*tensor, *rows, *channels),
                        to,
                    }
                }
                Step::Share { stage, to } => {
                    let to = index(to)?;
                    let tensor = TensorRef::Stage(*stage);
                    TimedStep::Send {
                        id: id_of((p, to, tensor, one_row, None, true)),
                        bytes: bytes(tensor, one_row, None),
                        to,
                    }
                }
                Step::Receive {
                    tensor,
                    rows,
                    channels,
                    from,
                } => TimedStep::Receive(id_of((index(from)?, p, *tensor, *rows, *channels, false))),
                Step::Drop { .. } | Step::Combine { .. } => TimedStep::Nothing,
            });
        }
        timed_programs.push(TimedProgram {
            steps: timed,
            origin,
        });
    }
    Ok(timed_programs)
}

/// A stream of frames through one candidate's programs ([`stream_timeline`]).
#[derive(Clone, Debug, PartialEq)]
pub struct StreamTimes {
    /// Per frame, when the coordinator sent its input, µs from the stream's start.
    pub admitted_us: Vec<f64>,
    /// Per frame, when every party had run its part of it.
    pub done_us: Vec<f64>,
}

impl StreamTimes {
    /// Frames per second over the whole stream: its frames over the time from the
    /// first input sent to the last frame's end; `None` without frames. Filling the
    /// pipeline counts, and so do the first frames, which start together: on short
    /// streams the two nearly cancel, where a rate counted after the first frames
    /// overestimates, and one over the second half converges slowly (VGG-16 on 6
    /// Fireflies at depth 3, 16 frames: this 0.3% below the rate of 256 frames, the
    /// rate after the first 3 frames 12% above, over the second half 14% above).
    pub fn fps(&self) -> Option<f64> {
        let last = *self.done_us.last()?;
        (last > 0.0).then(|| self.done_us.len() as f64 * 1e6 / last)
    }

    /// Per frame, from its admission to its end, µs.
    pub fn latencies_us(&self) -> Vec<f64> {
        self.admitted_us
            .iter()
            .zip(&self.done_us)
            .map(|(a, d)| d - a)
            .collect()
    }
}

/// The timeline of `frames` frames streamed through one candidate's programs, at most
/// `depth` in flight: the coordinator sends frame `f`'s inputs once frame `f - depth`
/// has come back (the first `depth` at once), and takes the frames' outputs in order.
/// Each board runs its program of every frame in flight at once ([`threads_timeline`]):
/// while its part of frame `f` waits for rows, it computes frame `f + 1`'s tiles whose
/// inputs are there, and of the tiles ready at once, the oldest frame's first. Run
/// step `k` of party `p` in frame `f` takes `compute(f, p, k)` µs; transfers as in
/// [`programs_timeline`]. Depth 1 is one inference after another.
pub fn stream_timeline(
    programs: &[Program],
    links: &[Link],
    bytes: impl Fn(TensorRef, Rows, Option<Rows>) -> u64,
    compute: impl Fn(usize, usize, usize) -> f64,
    frames: usize,
    depth: usize,
) -> Result<StreamTimes, String> {
    let depth = depth.max(1);
    let coordinator = programs
        .iter()
        .position(|p| p.party == Party::Coordinator)
        .ok_or("the programs have no coordinator")?;
    let mut ids = HashMap::new();
    let mut by_frame = vec![];
    for f in 0..frames {
        let compute = |p: usize, k: usize| compute(f, p, k);
        by_frame.push(timed_frame(programs, &bytes, &compute, f, &mut ids)?);
    }
    // Thread 0: the coordinator's steps, in the order it takes them. Then per frame,
    // each board's program of it: the threads of older frames come first.
    let mut threads: Vec<Vec<TimedStep>> = vec![vec![]];
    let mut party = vec![coordinator];
    // Per frame and party, the thread and step of its last step (None where it has
    // none).
    let mut last: Vec<Vec<Option<(usize, usize)>>> = vec![vec![None; programs.len()]; frames];
    for (f, frame) in by_frame.iter().enumerate() {
        for (p, timed) in frame.iter().enumerate() {
            if p != coordinator && !timed.steps.is_empty() {
                last[f][p] = Some((threads.len(), timed.steps.len() - 1));
                threads.push(timed.steps.clone());
                party.push(p);
            }
        }
    }
    // The coordinator sends a frame's inputs once the frame `depth` before it is back.
    let (sends, rest): (Vec<_>, Vec<_>) = by_frame
        .iter()
        .map(|frame| {
            frame[coordinator]
                .steps
                .iter()
                .partition::<Vec<TimedStep>, _>(|s| matches!(s, TimedStep::Send { .. }))
        })
        .unzip();
    // The coordinator's step before each frame's first send (None: the stream's start).
    let mut admitted_after: Vec<Option<usize>> = vec![None; frames];
    let mut sends = sends.into_iter();
    for f in 0..frames + depth {
        if f >= depth && !rest[f - depth].is_empty() {
            threads[0].extend(rest[f - depth].iter().cloned());
            last[f - depth][coordinator] = Some((0, threads[0].len() - 1));
        }
        if let Some(part) = sends.next() {
            admitted_after[f] = threads[0].len().checked_sub(1);
            threads[0].extend(part);
        }
    }
    let ends = threads_timeline(&threads, &party, links)
        .ok_or_else(|| "the programs wait on rows no program sends".to_string())?;
    let done_us = last
        .iter()
        .map(|frame| {
            frame
                .iter()
                .filter_map(|at| at.map(|(t, k)| ends[t][k]))
                .fold(0.0f64, f64::max)
        })
        .collect();
    let admitted_us = admitted_after
        .iter()
        .map(|k| k.map_or(0.0, |k| ends[0][k]))
        .collect();
    Ok(StreamTimes {
        admitted_us,
        done_us,
    })
}

/// When each of `groups` groups ends on a programs timeline (`ends`, from
/// [`programs_timeline`]): when its last tile ends, and the last group when every
/// program has ended (the coordinator has the outputs).
pub fn group_ends(programs: &[Program], ends: &[Vec<f64>], groups: usize) -> Vec<f64> {
    let mut group_end = vec![0.0f64; groups];
    for (p, program) in programs.iter().enumerate() {
        for (k, step) in program.steps.iter().enumerate() {
            if let Step::Run { group, .. } = step
                && *group < groups
            {
                group_end[*group] = group_end[*group].max(ends[p][k]);
            }
        }
    }
    let all = ends.iter().flatten().fold(0.0f64, |a, &b| a.max(b));
    if let Some(last) = group_end.last_mut() {
        *last = last.max(all);
    }
    // A group cannot end before the one before it.
    for g in 1..groups {
        group_end[g] = group_end[g].max(group_end[g - 1]);
    }
    group_end
}

/// Max-min fair rates of flows capped at `caps`, sharing `total`.
fn fair_rates(caps: &[f64], total: f64) -> Vec<f64> {
    let mut order: Vec<usize> = (0..caps.len()).collect();
    order.sort_by(|&a, &b| caps[a].total_cmp(&caps[b]));
    let mut rates = vec![0.0; caps.len()];
    let mut left = total;
    for (k, &i) in order.iter().enumerate() {
        let share = left / (caps.len() - k) as f64;
        rates[i] = caps[i].min(share);
        left -= rates[i];
    }
    rates
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Link = Link {
        mbps: 100.0,
        latency_ms: 0.2,
    };

    fn flow(start_us: f64, bytes: u64) -> Flow {
        Flow {
            start_us,
            bytes,
            link: FAST,
        }
    }

    #[test]
    fn board_to_board_sends_share_only_their_own_links() {
        use TimedStep::*;
        // Board 0 computes 10 µs, then sends 1000 bytes (80 µs at 100 Mbit/s) to each of
        // boards 1 and 2: its uplink serializes them. Board 3 sends to board 2 at the
        // same time over its own uplink, but board 2's downlink takes one at a time.
        let steps = vec![
            vec![
                Run(10.0),
                Send {
                    id: 0,
                    bytes: 1000,
                    to: 1,
                },
                Send {
                    id: 1,
                    bytes: 1000,
                    to: 2,
                },
            ],
            vec![Receive(0), Run(5.0)],
            vec![Receive(1), Receive(2)],
            vec![Send {
                id: 2,
                bytes: 1000,
                to: 2,
            }],
        ];
        let ends = program_timeline(&steps, &[FAST; 4]).unwrap();
        // Board 3's send goes first (at 0): board 2's downlink is busy until 80.
        assert_eq!(ends[3], [0.0]);
        // 10 + 80 + 200 latency, then 5 of compute.
        assert_eq!(ends[1], [290.0, 295.0]);
        // The second send leaves board 0 at 90 (its uplink) and ends at 170.
        assert_eq!(ends[2], [370.0, 370.0]);
        // A receive with no send never ends.
        assert_eq!(program_timeline(&[vec![Receive(9)]], &[FAST]), None);
        // A 1 Gbit/s sender feeds two 100 Mbit/s boards at once: 1000 bytes take 80 µs
        // at 100 Mbit/s and hold the fast uplink 8 µs each.
        let hub = Link {
            mbps: 1000.0,
            latency_ms: 0.0,
        };
        let fan_out = vec![
            vec![
                Send {
                    id: 0,
                    bytes: 1000,
                    to: 1,
                },
                Send {
                    id: 1,
                    bytes: 1000,
                    to: 2,
                },
            ],
            vec![Receive(0)],
            vec![Receive(1)],
        ];
        let ends = program_timeline(&fan_out, &[hub, FAST, FAST]).unwrap();
        assert_eq!((ends[1][0], ends[2][0]), (280.0, 288.0));
    }

    /// Program steps on row 0 of a tensor, for hand-timed programs.
    fn send(tensor: TensorRef, to: &Party) -> Step {
        Step::Send {
            tensor,
            rows: Rows::new(0, 1),
            channels: None,
            to: to.clone(),
        }
    }

    fn receive(tensor: TensorRef, from: &Party) -> Step {
        Step::Receive {
            tensor,
            rows: Rows::new(0, 1),
            channels: None,
            from: from.clone(),
        }
    }

    fn run(group: usize) -> Step {
        Step::Run {
            group,
            tile: 0,
            phase: 0,
        }
    }

    /// Two boards in a chain: the coordinator sends the input to A, A runs and sends its
    /// output to B, B runs and sends the result back.
    fn chain() -> Vec<Program> {
        use crate::Party::{Coordinator, Device};
        let (a, b) = (Device("a".into()), Device("b".into()));
        let (input, mid, out) = (
            TensorRef::Input,
            TensorRef::Stage(legion_ir::StageId(0)),
            TensorRef::Stage(legion_ir::StageId(1)),
        );
        vec![
            Program {
                party: Coordinator,
                steps: vec![send(input, &a), receive(out, &b)],
            },
            Program {
                party: a.clone(),
                steps: vec![receive(input, &Coordinator), run(0), send(mid, &b)],
            },
            Program {
                party: b.clone(),
                steps: vec![receive(mid, &a), run(1), send(out, &Coordinator)],
            },
        ]
    }

    #[test]
    fn frames_overlap_on_boards_in_a_chain() {
        let no_latency = Link {
            mbps: 100.0,
            latency_ms: 0.0,
        };
        let links = [no_latency; 3];
        // 1250 bytes take 100 µs at 100 Mbit/s; every run takes 1000 µs.
        let bytes = |_, _, _| 1250;
        let compute = |_, p, _| if p == 0 { 0.0 } else { 1000.0 };
        // One frame: 100 in, 1000 on A, 100 to B, 1000 on B, 100 back.
        let one = stream_timeline(&chain(), &links, bytes, compute, 3, 1).unwrap();
        assert_eq!(one.done_us, [2300.0, 4600.0, 6900.0]);
        assert_eq!(one.admitted_us, [0.0, 2300.0, 4600.0]);
        assert_eq!(
            one.done_us,
            [1, 2, 3].map(|n| n as f64
                * programs_timeline(&chain(), &links, bytes, |p, k| compute(0, p, k)).unwrap()[0]
                    [1])
        );
        // Two in flight: A starts frame 1 once it is done with frame 0 (its input is
        // there since 200), so a frame leaves B every 1000 µs.
        let two = stream_timeline(&chain(), &links, bytes, compute, 3, 2).unwrap();
        assert_eq!(two.done_us, [2300.0, 3300.0, 4600.0]);
        // Frame 2 goes in when frame 0 is back.
        assert_eq!(two.admitted_us, [0.0, 0.0, 2300.0]);
        assert_eq!(two.latencies_us(), [2300.0, 3300.0, 2300.0]);
        assert_eq!(one.fps(), Some(3.0 * 1e6 / 6900.0));
        assert_eq!(two.fps(), Some(3.0 * 1e6 / 4600.0));
        // Three in flight: A is never idle after the first frame.
        let three = stream_timeline(&chain(), &links, bytes, compute, 3, 3).unwrap();
        assert_eq!(three.done_us, [2300.0, 3300.0, 4300.0]);
    }

    /// The coordinator feeds boards A and B; A computes a map B needs halfway through
    /// its own part (like a halo).
    fn diamond() -> Vec<Program> {
        let (a, b) = (Party::Device("a".into()), Party::Device("b".into()));
        let (input, mid, out) = (
            TensorRef::Input,
            TensorRef::Stage(legion_ir::StageId(0)),
            TensorRef::Stage(legion_ir::StageId(1)),
        );
        vec![
            Program {
                party: Party::Coordinator,
                steps: vec![send(input, &a), send(input, &b), receive(out, &b)],
            },
            Program {
                party: a.clone(),
                steps: vec![receive(input, &Party::Coordinator), run(0), send(mid, &b)],
            },
            Program {
                party: b.clone(),
                steps: vec![
                    receive(input, &Party::Coordinator),
                    run(0),
                    receive(mid, &a),
                    run(1),
                    send(out, &Party::Coordinator),
                ],
            },
        ]
    }

    #[test]
    fn a_board_computes_the_next_frame_while_one_waits_for_rows() {
        let links = [Link {
            mbps: 100.0,
            latency_ms: 0.0,
        }; 3];
        // A's map takes 1000 µs to B, every other message 100 µs; every run 1000 µs.
        let mid = TensorRef::Stage(legion_ir::StageId(0));
        let bytes = |t, _, _| if t == mid { 12_500 } else { 1250 };
        let compute = |_, p, _| if p == 0 { 0.0 } else { 1000.0 };
        // One frame: inputs at 100 (A) and 200 (B); A's map 1100-2100; B runs 200-1200
        // and 2100-3100; the output is back at 3200.
        let one = stream_timeline(&diamond(), &links, bytes, compute, 2, 1).unwrap();
        assert_eq!(one.done_us, [3200.0, 6400.0]);
        // Two in flight (inputs at 100, 200, 300, 400): B runs frame 1's first tile
        // 1200-2200 while frame 0 waits for A's map (there at 2100); frame 0's second
        // tile waits for it (a running tile is not interrupted): 2200-3200, back at
        // 3300. Frame 1's map (A 1100-2100, sent 2100-3100) and tile 3200-4200: 4300.
        let two = stream_timeline(&diamond(), &links, bytes, compute, 2, 2).unwrap();
        assert_eq!(two.done_us, [3300.0, 4300.0]);
        assert_eq!(two.admitted_us, [0.0, 0.0]);
    }

    #[test]
    fn a_lone_flow_pays_latency_and_bandwidth() {
        // 1 MB at 100 Mbit/s = 80 ms, plus 0.2 ms
        assert_eq!(
            arrival_times(&[flow(10.0, 1_000_000)], 1000.0),
            vec![80_210.0]
        );
        assert_eq!(
            arrival_times(&[flow(0.0, 1_000_000)], 1000.0)[0],
            FAST.time_us(1_000_000)
        );
    }

    #[test]
    fn device_links_do_not_contend_below_the_hub() {
        // 6 x 100 Mbit/s fit in 1 Gbit/s: all arrive as if alone
        let flows: Vec<Flow> = (0..6).map(|_| flow(0.0, 1_000_000)).collect();
        for t in arrival_times(&flows, 1000.0) {
            assert!((t - 80_200.0).abs() < 1e-6, "{t}");
        }
    }

    #[test]
    fn the_hub_bounds_the_bytes_in_flight() {
        // 4 x 1 MB over a 200 Mbit/s hub: 50 Mbit/s each, 160 ms
        let flows: Vec<Flow> = (0..4).map(|_| flow(0.0, 1_000_000)).collect();
        for t in arrival_times(&flows, 200.0) {
            assert!((t - 160_200.0).abs() < 1e-6, "{t}");
        }
    }

    #[test]
    fn a_finished_flow_frees_its_share() {
        // hub 100: two flows share 50/50; the 0.5 MB one ends at 80 ms having sent
        // 0.5 MB; the other then has 0.5 MB left at full 100 Mbit/s: 40 ms more.
        let t = arrival_times(&[flow(0.0, 500_000), flow(0.0, 1_000_000)], 100.0);
        assert!((t[0] - 80_200.0).abs() < 1e-6, "{t:?}");
        assert!((t[1] - 120_200.0).abs() < 1e-6, "{t:?}");
    }

    #[test]
    fn a_late_flow_joins_and_slows_the_others() {
        // hub 100: flow 0 alone for 40 ms (0.5 MB), then shares with flow 1
        let t = arrival_times(&[flow(0.0, 1_000_000), flow(40_000.0, 250_000)], 100.0);
        // flow 1: 0.25 MB at 50 Mbit/s = 40 ms, done at 80 ms; flow 0 has sent
        // 0.5 + 0.25 MB by then, 0.25 MB left at 100 Mbit/s = 20 ms: done at 100 ms
        assert!((t[1] - 80_200.0).abs() < 1e-6, "{t:?}");
        assert!((t[0] - 100_200.0).abs() < 1e-6, "{t:?}");
    }

    #[test]
    fn a_slow_device_link_leaves_the_rest_to_others() {
        let slow = Flow {
            start_us: 0.0,
            bytes: 1_000_000,
            link: Link {
                mbps: 10.0,
                latency_ms: 0.0,
            },
        };
        let fast = Flow {
            link: Link {
                mbps: 1000.0,
                latency_ms: 0.0,
            },
            ..slow
        };
        // hub 100: slow gets its 10, fast gets the other 90
        let t = arrival_times(&[slow, fast], 100.0);
        assert!((t[0] - 800_000.0).abs() < 1e-6, "{t:?}");
        assert!((t[1] - 8e6 / 90.0).abs() < 1e-6, "{t:?}");
    }

    #[test]
    fn empty_flows_arrive_after_latency() {
        assert_eq!(arrival_times(&[flow(5.0, 0)], 1000.0), vec![205.0]);
        assert!(arrival_times(&[], 1000.0).is_empty());
    }

    #[test]
    fn a_step_gathers_each_device_once_it_has_computed() {
        let part = |bytes_in, compute_us, bytes_out| StepPart {
            bytes_in,
            link_in: FAST,
            compute_us,
            bytes_out,
            link_out: FAST,
        };
        // hub 100: both scatters share it (1 MB each: 160 ms + latency); device 0
        // computes 10 ms, device 1 100 ms; device 0's 0.5 MB gather runs alone at
        // 100 Mbit/s (40 ms) and ends before device 1's starts.
        let t = step_timeline(
            &[
                part(1_000_000, 10_000.0, 500_000),
                part(1_000_000, 100_000.0, 500_000),
            ],
            100.0,
        );
        for (k, compute) in [(0, 10_000.0), (1, 100_000.0)] {
            assert!((t[k].inputs_in_us - 160_200.0).abs() < 1e-6, "{t:?}");
            assert_eq!(t[k].computed_us, t[k].inputs_in_us + compute);
            assert!(
                (t[k].done_us - (t[k].computed_us + 40_200.0)).abs() < 1e-6,
                "{t:?}"
            );
        }
    }
}
