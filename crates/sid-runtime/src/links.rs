//! Stages in other processes: the transport between ranks.
//!
//! Nothing here schedules anything. Each process runs its stage with the same
//! [`ChannelTransport`] and [`crate::schedule`] as a stage thread; *links* — one thread per
//! direction and peer — move what enters and leaves those channels to and from other ranks
//! ([`crate::ranks`] says which rank holds what):
//! - messages down the chain (tag [`DOWN`]): rank n → rank n+1, and the coordinator (rank 0)
//!   → stage 1 of every other replica;
//! - reports to the coordinator (tag [`REPORTS`]): every rank → rank 0;
//! - gradients up the chain (tag [`GRADS`], backprop pipelines only): rank n+1 → rank n.
//!
//! Each item travels as a frame: an int64 header naming what it is and the shapes of up to
//! four tensors, then those tensors, contiguous on the CPU (Gloo carries CPU tensors) — or,
//! between two GPUs when NCCL is built in, the header over Gloo and the tensors GPU to GPU over
//! a two-rank NCCL group of the link's own (one group per link and direction, so that each
//! communicator sees its operations in one order on both sides; built, never run: it needs two
//! GPUs). A link that ends normally sends a stop frame; one that breaks (the peer
//! died) is reported naming the ranks and the operation, and stops the run.
//!
//! A frame is read against what its link carries before anything is allocated for it
//! ([`check_header`]): the kinds of frame the link's direction may carry, each kind's number of
//! tensors, their dtypes and shapes (a belief is as wide as the model has classes; a batch's
//! tensors agree on its size), a non-negative step and micro-batch, and a bound on the bytes a
//! frame may hold. A malformed or hostile frame — negative or huge sizes, a wrong dtype, an
//! unknown kind — is a one-line error naming the rank that sent it.

use std::io::Cursor;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use sid_dist::Group;
use tch::{Device, Kind, Tensor};

use crate::config::{PipelineMethod, StagedConfig};
use crate::ranks::{rank_of, Ranks, DOWN, GRADS, REPORTS};
use crate::schedule::StageRunner;
use crate::setup::{build_runners, channel, spawn_stage, spawn_thread, Engine, StageThread};
use crate::transport::{ChannelTransport, Filed, Message, Report, Tag};
use crate::{Failure, Result, RuntimeError};

/// A link's wait for its peer: links wait as long as the run lasts (a stage may idle while
/// the coordinator evaluates); a dead peer ends the wait at once, a hung one is caught by the
/// step timeout of whoever waits for its results.
const LINK_WAIT: Duration = Duration::from_secs(30 * 24 * 3600);

// ---------------------------------------------------------------------------------------------
// Frames

const HEADER: usize = 48;
const MAX_TENSORS: usize = 4;
const MAX_DIMS: usize = 7;
const FIXED: usize = 10;

/// Added to a tensor's kind code in the header: the tensor follows over the link's NCCL group.
const DIRECT: i64 = 1000;
/// The least bound on a frame's bytes: activations of a large evaluation batch fit (1000
/// images of 64 × 64 px with 64 channels at full size take 1 GiB).
const MIN_FRAME_BYTES: u64 = 4 << 30;
/// The most micro-batches a step may announce.
const MAX_MICRO_BATCHES: i64 = 1 << 16;

const STOP: i64 = 0;
const TRAIN: i64 = 1;
const EVAL: i64 = 2;
const STATE: i64 = 3;
const LOAD: i64 = 4;
const LOSSES: i64 = 11;
const LOGITS: i64 = 12;
const STATE_REPORT: i64 = 13;
const LOADED: i64 = 14;
const FAILED: i64 = 15;
const GRAD: i64 = 21;

/// One item on a link, flattened: numbers in the header, then tensors.
#[derive(Default)]
struct Frame {
    kind: i64,
    /// The step and micro-batch of a message or gradient; a report's step.
    tag: Tag,
    count: usize,
    scale: f64,
    aux: i64,
    busy: Duration,
    forward: Duration,
    tensors: Vec<Tensor>,
}

/// Each tensor kind a frame may carry and its code in the header (libtorch's scalar type).
const KIND_CODES: [(Kind, i64); 9] = [
    (Kind::Uint8, 0),
    (Kind::Int8, 1),
    (Kind::Int, 3),
    (Kind::Int64, 4),
    (Kind::Half, 5),
    (Kind::Float, 6),
    (Kind::Double, 7),
    (Kind::Bool, 11),
    (Kind::BFloat16, 15),
];

fn kind_code(k: Kind) -> Result<i64, String> {
    KIND_CODES
        .iter()
        .find(|(kind, _)| *kind == k)
        .map(|&(_, c)| c)
        .ok_or_else(|| format!("cannot send tensors of kind {k:?}"))
}

fn code_kind(c: i64) -> Result<Kind, String> {
    KIND_CODES
        .iter()
        .find(|(_, code)| *code == c)
        .map(|&(k, _)| k)
        .ok_or_else(|| format!("a frame names an unknown tensor kind {c}"))
}

/// What a link accepts from its peer: its direction (tag) says which frames may come.
#[derive(Debug, Clone, Copy)]
struct Expect {
    /// The link's tag: [`DOWN`], [`REPORTS`] or [`GRADS`].
    tag: u32,
    /// The model's classes: the width of every belief.
    classes: i64,
    /// The most bytes a frame's tensors may hold together.
    max_bytes: u64,
}

impl Expect {
    /// What a link of `tag` accepts in the pipeline `cfg` describes. A frame holds at most a
    /// stage's whole state (every parameter with Adam's two moments, in float32, twice over
    /// for names and alignment) or 4 GiB of activations, whichever is more. (Stages in other
    /// processes run the built-in backbone `cfg.model` names.)
    fn new(cfg: &StagedConfig, tag: u32) -> Self {
        let params = sid_core::extractor::ParamCounts::of(&cfg.model).total();
        Self {
            tag,
            classes: cfg.model.num_classes,
            max_bytes: (params.max(0) as u64)
                .saturating_mul(3 * 4 * 2)
                .max(MIN_FRAME_BYTES),
        }
    }
}

/// A tensor a header announces: its kind, its shape, and whether it follows GPU to GPU.
#[derive(Debug)]
struct Announced {
    kind: Kind,
    size: Vec<i64>,
    gpu: bool,
}

const FLOATS: &[Kind] = &[Kind::Float, Kind::Half, Kind::BFloat16, Kind::Double];
const BYTES: &[Kind] = &[Kind::Uint8];

/// Each kind of frame: the link it travels on ([`DOWN`], [`REPORTS`] or [`GRADS`]; a stop
/// ends any link) and its tensors' dtypes.
const LAYOUTS: [(i64, u32, &[&[Kind]]); 11] = [
    (STOP, 0, &[]),
    (TRAIN, DOWN, &[FLOATS, FLOATS, &[Kind::Int64]]),
    (EVAL, DOWN, &[FLOATS, FLOATS]),
    (STATE, DOWN, &[]),
    (LOAD, DOWN, &[BYTES]),
    (LOSSES, REPORTS, &[&[Kind::Double]]),
    // None for an empty inference batch (no modules on the stage).
    (LOGITS, REPORTS, &[FLOATS]),
    (STATE_REPORT, REPORTS, &[BYTES]),
    (LOADED, REPORTS, &[]),
    (FAILED, REPORTS, &[BYTES]),
    (GRAD, GRADS, &[FLOATS]),
];

/// Reads a header from rank `src` against what its link expects; returns the tensors to
/// receive, each checked (dtype, shape, bytes) before any is allocated.
fn check_header(h: &[i64], src: usize, e: &Expect) -> Result<Vec<Announced>, String> {
    let bad = |what: String| format!("rank {src} sent a malformed frame: {what}");
    let kind = h[0];
    let link = match e.tag {
        DOWN => "messages down the pipeline",
        REPORTS => "reports",
        GRADS => "gradients",
        other => return Err(bad(format!("it came on an unknown link tag {other}"))),
    };
    let layout = LAYOUTS
        .iter()
        .find(|&&(k, tag, _)| k == kind && (tag == e.tag || k == STOP));
    let Some(&(_, _, mut wanted)) = layout else {
        return Err(bad(format!("kind {kind} on a link that carries {link}")));
    };
    if h[1] < 0 {
        return Err(bad(format!("step {}", h[1])));
    }
    let n = h[9];
    if !(0..=MAX_TENSORS as i64).contains(&n) {
        return Err(bad(format!(
            "{n} tensors (at most {MAX_TENSORS} in a frame)"
        )));
    }
    let n = n as usize;
    if kind == LOGITS && h[3] <= 0 {
        wanted = &[];
    }
    if n != wanted.len() {
        return Err(bad(format!(
            "{n} tensors in a frame of kind {kind}, which has {}",
            wanted.len()
        )));
    }
    if kind == TRAIN && !(1..=MAX_MICRO_BATCHES).contains(&h[3]) {
        return Err(bad(format!("{} micro-batches in a step", h[3])));
    }
    if kind == TRAIN && !(0..h[3]).contains(&h[2]) {
        return Err(bad(format!("micro-batch {} of {}", h[2], h[3])));
    }
    let mut total: u64 = 0;
    let mut out = Vec::with_capacity(n);
    for (i, kinds) in wanted.iter().enumerate() {
        let at = FIXED + i * (2 + MAX_DIMS);
        let code = h[at];
        if !(0..2 * DIRECT).contains(&code) {
            return Err(bad(format!("tensor {i} has kind code {code}")));
        }
        let tkind = code_kind(code % DIRECT).map_err(bad)?;
        if !kinds.contains(&tkind) {
            return Err(bad(format!(
                "tensor {i} of a frame of kind {kind} is {tkind:?}, not {kinds:?}"
            )));
        }
        let dims = h[at + 1];
        if !(0..=MAX_DIMS as i64).contains(&dims) {
            return Err(bad(format!("tensor {i} has {dims} dimensions")));
        }
        let size = h[at + 2..at + 2 + dims as usize].to_vec();
        let mut numel: u64 = 1;
        for &d in &size {
            let d = u64::try_from(d).map_err(|_| bad(format!("tensor {i} has size {size:?}")))?;
            numel = numel
                .checked_mul(d)
                .ok_or_else(|| bad(format!("tensor {i} of size {size:?} is too large")))?;
        }
        total = numel
            .checked_mul(tkind.elt_size_in_bytes() as u64)
            .and_then(|b| total.checked_add(b))
            .filter(|&t| t <= e.max_bytes)
            .ok_or_else(|| {
                bad(format!(
                    "tensor {i} of size {size:?} would take the frame past {} bytes",
                    e.max_bytes
                ))
            })?;
        out.push(Announced {
            kind: tkind,
            size,
            gpu: code >= DIRECT,
        });
    }
    // Shapes: a batch's tensors agree on its size; beliefs have one column per class (a
    // backprop stage passes none: an empty tensor).
    let shape = |i: usize| out[i].size.as_slice();
    let belief = |i: usize, batch: i64| shape(i) == [batch, e.classes] || shape(i) == [0];
    let fits = match kind {
        TRAIN | EVAL => {
            let batch = shape(0).first().copied();
            batch.is_some_and(|b| belief(1, b) && (kind == EVAL || shape(2) == [b]))
        }
        LOAD | STATE_REPORT | FAILED | LOSSES => shape(0).len() == 1,
        LOGITS if n == 1 => shape(0).len() == 3 && shape(0)[0] == h[3] && shape(0)[2] == e.classes,
        GRAD => !shape(0).is_empty(),
        _ => true,
    };
    if !fits {
        let sizes: Vec<&[i64]> = (0..n).map(shape).collect();
        return Err(bad(format!(
            "tensors of sizes {sizes:?} in a frame of kind {kind} ({} classes)",
            e.classes
        )));
    }
    Ok(out)
}

/// Sends a frame: the header over `g`, then each tensor over `g` from host memory, or — CUDA
/// tensors on a link with a `direct` group — GPU to GPU over that group. Every frame built
/// here holds at most [`MAX_TENSORS`] tensors.
fn send_frame(
    g: &Group,
    dst: usize,
    tag: u32,
    f: Frame,
    direct: Option<&Group>,
) -> Result<(), String> {
    let mut h = [0i64; HEADER];
    h[0] = f.kind;
    h[1] = f.tag.step as i64;
    h[2] = f.tag.micro as i64;
    h[3] = f.count as i64;
    h[4] = f.scale.to_bits() as i64;
    // h[5] is not used.
    h[6] = f.aux;
    h[7] = f.busy.as_nanos() as i64;
    h[8] = f.forward.as_nanos() as i64;
    h[9] = f.tensors.len() as i64;
    let mut payload = Vec::with_capacity(f.tensors.len());
    for (i, t) in f.tensors.iter().enumerate() {
        let size = t.size();
        if size.len() > MAX_DIMS {
            return Err(format!("cannot send a tensor of {} dimensions", size.len()));
        }
        let at = FIXED + i * (2 + MAX_DIMS);
        let gpu = direct.is_some() && t.device().is_cuda();
        h[at] = kind_code(t.kind())? + if gpu { DIRECT } else { 0 };
        h[at + 1] = size.len() as i64;
        h[at + 2..at + 2 + size.len()].copy_from_slice(&size);
        payload.push(if gpu {
            t.contiguous()
        } else {
            t.to_device(Device::Cpu).contiguous()
        });
    }
    g.send(&Tensor::from_slice(&h), dst, tag, LINK_WAIT)
        .map_err(text)?;
    for t in payload.iter().filter(|t| t.numel() > 0) {
        let (group, peer, t_tag) = match direct {
            Some(ng) if t.device().is_cuda() => (ng, 1, 0),
            _ => (g, dst, tag),
        };
        group.send(t, peer, t_tag, LINK_WAIT).map_err(text)?;
        // NCCL's wait only orders this thread's stream after the transfer.
        crate::streams::sync_device(t.device()).map_err(text)?;
    }
    Ok(())
}

/// Receives a frame sent by [`send_frame`], checked against `expect` ([`check_header`]) before
/// anything is allocated; direct tensors land on `direct`'s device.
fn recv_frame(
    g: &Group,
    src: usize,
    expect: &Expect,
    direct: Option<(&Group, Device)>,
) -> Result<Frame, String> {
    let tag = expect.tag;
    let mut header = Tensor::zeros([HEADER as i64], (Kind::Int64, Device::Cpu));
    g.recv(&mut header, src, tag, LINK_WAIT).map_err(text)?;
    let h = Vec::<i64>::try_from(&header).map_err(text)?;
    let mut tensors = Vec::new();
    for Announced { kind, size, gpu } in check_header(&h, src, expect)? {
        let (group, peer, t_tag, device) = match (gpu, direct) {
            (true, Some((ng, device @ Device::Cuda(_)))) => (ng, 0, 0, device),
            (true, _) => {
                return Err(format!(
                    "rank {src} sent a GPU tensor directly, but this link has no NCCL group"
                ))
            }
            (false, _) => (g, src, tag, Device::Cpu),
        };
        let mut t = Tensor::f_empty(&size, (kind, device))
            .map_err(|e| format!("receiving a tensor of size {size:?} from rank {src}: {e}"))?;
        if t.numel() > 0 {
            group.recv(&mut t, peer, t_tag, LINK_WAIT).map_err(text)?;
            crate::streams::sync_device(device).map_err(text)?;
        }
        tensors.push(t);
    }
    Ok(Frame {
        kind: h[0],
        tag: Tag::new(h[1] as u64, h[2] as usize),
        count: h[3] as usize,
        scale: f64::from_bits(h[4] as u64),
        aux: h[6],
        busy: Duration::from_nanos(h[7].max(0) as u64),
        forward: Duration::from_nanos(h[8].max(0) as u64),
        tensors,
    })
}

/// An error as the one-line text a link reports.
fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn named_to_bytes(named: &[(String, Tensor)]) -> Result<Tensor, String> {
    let mut buf = Vec::new();
    let cpu: Vec<(String, Tensor)> = named
        .iter()
        .map(|(n, t)| (n.clone(), t.to_device(Device::Cpu)))
        .collect();
    Tensor::save_multi_to_stream(&cpu, &mut buf).map_err(text)?;
    Ok(Tensor::from_slice(&buf))
}

fn bytes_to_named(t: &Tensor) -> Result<Vec<(String, Tensor)>, String> {
    let b = Vec::<u8>::try_from(t).map_err(text)?;
    Tensor::load_multi_from_stream(Cursor::new(b)).map_err(text)
}

/// The first `N` tensors of a frame of `what`.
fn take<const N: usize>(mut tensors: Vec<Tensor>, what: &str) -> Result<[Tensor; N], String> {
    tensors.truncate(N);
    tensors
        .try_into()
        .map_err(|_| format!("a {what} frame is missing a tensor"))
}

/// The one tensor of a frame of `what`.
fn one(tensors: Vec<Tensor>, what: &str) -> Result<Tensor, String> {
    take(tensors, what).map(|[t]| t)
}

/// A frame of `kind` tagged `tag` carrying `tensors`; its other numbers are zero.
fn frame(kind: i64, tag: Tag, tensors: Vec<Tensor>) -> Frame {
    Frame {
        kind,
        tag,
        tensors,
        ..Frame::default()
    }
}

fn message_frame(m: Message) -> Result<Frame, String> {
    Ok(match m {
        Message::Train {
            tag,
            micro_batches,
            input,
            p,
            labels,
            scale,
        } => Frame {
            count: micro_batches,
            scale,
            ..frame(TRAIN, tag, vec![input, p, labels])
        },
        Message::Eval { tag, input, p } => frame(EVAL, tag, vec![input, p]),
        Message::State { tag } => frame(STATE, tag, Vec::new()),
        Message::Load { tag, named } => frame(LOAD, tag, vec![named_to_bytes(&named)?]),
    })
}

fn frame_message(f: Frame) -> Result<Message, String> {
    let tag = f.tag;
    Ok(match f.kind {
        TRAIN => {
            let [input, p, labels] = take(f.tensors, "training")?;
            Message::Train {
                tag,
                micro_batches: f.count,
                input,
                p,
                labels,
                scale: f.scale,
            }
        }
        EVAL => {
            let [input, p] = take(f.tensors, "inference")?;
            Message::Eval { tag, input, p }
        }
        STATE => Message::State { tag },
        LOAD => Message::Load {
            tag,
            named: bytes_to_named(&one(f.tensors, "checkpoint")?)?,
        },
        other => return Err(format!("a message frame of unknown kind {other}")),
    })
}

fn report_frame((_, r): Filed) -> Result<Frame, String> {
    Ok(match r {
        Report::Losses {
            step,
            losses,
            busy,
            forward,
        } => {
            let f = frame(LOSSES, Tag::new(step, 0), vec![Tensor::from_slice(&losses)]);
            Frame { busy, forward, ..f }
        }
        Report::Logits { step, logits } => {
            let count = logits.len();
            let tensors = (count > 0).then(|| Tensor::stack(&logits, 0));
            Frame {
                count,
                ..frame(LOGITS, Tag::new(step, 0), tensors.into_iter().collect())
            }
        }
        Report::State(state) => frame(STATE_REPORT, Tag::default(), vec![named_to_bytes(&state)?]),
        Report::Loaded => frame(LOADED, Tag::default(), Vec::new()),
        Report::Failed(Failure { module, cause }) => {
            let cause = Tensor::from_slice(cause.as_bytes());
            let f = frame(FAILED, Tag::default(), vec![cause]);
            let aux = module.map_or(0, |m| m as i64);
            Frame { aux, ..f }
        }
    })
}

/// A report's own numbers and tensors (the coordinator knows its stage: the rank it came from).
fn frame_report(f: Frame) -> Result<Report, String> {
    Ok(match f.kind {
        LOSSES => Report::Losses {
            step: f.tag.step,
            losses: Vec::<f64>::try_from(&one(f.tensors, "losses")?).map_err(text)?,
            busy: f.busy,
            forward: f.forward,
        },
        LOGITS => Report::Logits {
            step: f.tag.step,
            logits: if f.count == 0 {
                Vec::new()
            } else {
                one(f.tensors, "logits")?.unbind(0)
            },
        },
        STATE_REPORT => Report::State(bytes_to_named(&one(f.tensors, "state")?)?),
        LOADED => Report::Loaded,
        FAILED => Report::Failed(Failure {
            module: (f.aux > 0).then_some(f.aux as usize),
            cause: String::from_utf8_lossy(
                &Vec::<u8>::try_from(&one(f.tensors, "failure")?).unwrap_or_default(),
            )
            .into_owned(),
        }),
        other => return Err(format!("a report frame of unknown kind {other}")),
    })
}

fn grad_frame((tag, g): (Tag, Tensor)) -> Result<Frame, String> {
    Ok(frame(GRAD, tag, vec![g]))
}

fn frame_grad(f: Frame) -> Result<(Tag, Tensor), String> {
    // The link's header check let only gradients through.
    Ok((f.tag, one(f.tensors, "gradient")?))
}

// ---------------------------------------------------------------------------------------------
// Links

/// Sends what arrives on `rx` to rank `dst` until `rx` closes, then a stop frame. On failure
/// the channel is dropped (so the stage sending into it stops) after `on_fail` has run.
fn out_link<T: Send + 'static>(
    ranks: &Ranks,
    dst: usize,
    tag: u32,
    rx: Receiver<T>,
    encode: fn(T) -> Result<Frame, String>,
    fail: &impl OnFail,
) -> StageThread {
    let on_fail = fail.clone();
    let g = ranks.world.clone();
    let me = g.rank();
    let direct = ranks.direct.get(&(me, dst, tag)).cloned();
    let what = format!("the link from rank {me} to rank {dst}");
    spawn_thread(format!("sid-link-{me}-to-{dst}"), what, move || {
        let result = (|| {
            while let Ok(item) = rx.recv() {
                send_frame(&g, dst, tag, encode(item)?, direct.as_deref())?;
            }
            send_frame(&g, dst, tag, Frame::default(), None)
        })();
        if let Err(e) = &result {
            let cause = format!("the link from rank {me} to rank {dst} failed: {e}");
            on_fail(dst, cause);
        }
        drop(rx);
        result
    })
}

/// Receives from rank `src` into `tx` until a stop frame (then `tx` closes, so the stage
/// reading it ends normally) or a failure (`on_fail` runs first).
fn in_link<T: Send + 'static>(
    cfg: &StagedConfig,
    ranks: &Ranks,
    src: usize,
    tag: u32,
    tx: Sender<T>,
    decode: impl Fn(Frame) -> Result<T, String> + Send + 'static,
    fail: &impl OnFail,
) -> StageThread {
    let (device, expect, on_fail) = (cfg.devices[0], Expect::new(cfg, tag), fail.clone());
    let g = ranks.world.clone();
    let me = g.rank();
    let direct = ranks.direct.get(&(src, me, expect.tag)).cloned();
    let what = format!("the link from rank {src} to rank {me}");
    spawn_thread(format!("sid-link-{me}-from-{src}"), what, move || {
        let result = (|| loop {
            let f = recv_frame(&g, src, &expect, direct.as_deref().map(|ng| (ng, device)))?;
            // A stop frame ends the link, as does a stage that has stopped (its own failure
            // says why).
            if f.kind == STOP || tx.send(decode(f)?).is_err() {
                return Ok(());
            }
        })();
        if let Err(e) = &result {
            on_fail(src, format!("rank {me} lost rank {src}: {e}"));
        }
        drop(tx);
        result
    })
}

/// What a link does when it fails, given the peer rank and the cause.
trait OnFail: Fn(usize, String) + Clone + Send + 'static {}
impl<F: Fn(usize, String) + Clone + Send + 'static> OnFail for F {}

/// Runs this rank's stage `s` in a thread between `upstream` and `reports`, linked down the
/// chain to the next rank and, in a backprop pipeline, for gradients from the next rank and to
/// the previous one: the links that send go into `outs`, those that receive into `ins`.
fn run_linked_stage(
    cfg: &StagedConfig,
    ranks: &Ranks,
    mut runner: StageRunner,
    s: usize,
    (upstream, reports): (Receiver<Message>, Sender<Filed>),
    fail: &impl OnFail,
    (outs, ins): &mut (Vec<StageThread>, Vec<StageThread>),
) -> StageThread {
    let me = ranks.rank();
    let k = cfg.plan.len();
    let bp = matches!(cfg.method, PipelineMethod::Bp(_));
    let device = cfg.devices[0];
    let next = me + 1;
    let downstream = (s + 1 < k).then(|| {
        let (tx, rx) = channel(cfg);
        outs.push(out_link(ranks, next, DOWN, rx, message_frame, fail));
        tx
    });
    let mut transport =
        ChannelTransport::new(s, device, upstream, downstream, reports, cfg.timeout);
    if bp && s + 1 < k {
        let (tx, rx) = channel(cfg);
        ins.push(in_link(cfg, ranks, next, GRADS, tx, frame_grad, fail));
        transport.grads_in.push((s + 1, rx));
    }
    if bp && s > 0 {
        let (tx, rx) = channel(cfg);
        outs.push(out_link(ranks, me - 1, GRADS, rx, grad_frame, fail));
        transport.grad_out = Some((s - 1, tx));
    }
    runner.replicas = ranks.replica_group.clone();
    spawn_stage(cfg, runner, transport, 1)
}

/// Rank 0: runs stage 1 of replica 1 in a thread as the coordinator's first stage and links
/// the coordinator to the other ranks: inputs to every replica (stage 1's input of each),
/// reports from every rank, and the threads to wait for when it closes.
pub(crate) fn spawn_coordinator_links(
    cfg: &StagedConfig,
    ranks: &Ranks,
    runners: Vec<StageRunner>,
) -> Result<Engine> {
    let k = runners.len();
    ranks.check(k)?;
    if ranks.rank() != 0 {
        return Err(RuntimeError::Config(format!(
            "rank {} runs a stage (serve), not the coordinator",
            ranks.rank()
        )));
    }
    let (report_tx, reports) = crossbeam_channel::unbounded::<Filed>();
    let tx = report_tx.clone();
    let failed_link = move |slot: usize, cause: String| {
        let _ = tx.send((slot, Report::Failed(Failure::new(cause))));
    };
    let (first, upstream) = channel(cfg);
    let runner = runners.into_iter().next().expect("at least one stage");
    let mut links = (Vec::new(), Vec::new());
    let chain = (upstream, report_tx.clone());
    let stage = run_linked_stage(cfg, ranks, runner, 0, chain, &failed_link, &mut links);
    let mut threads = vec![stage];
    let mut firsts = vec![first];
    for r in 1..ranks.replicas {
        let (tx, rx) = channel(cfg);
        let dst = rank_of(r, 0, k);
        threads.push(out_link(ranks, dst, DOWN, rx, message_frame, &failed_link));
        firsts.push(tx);
    }
    for src in 1..ranks.world.world() {
        let decode = move |f| frame_report(f).map(|r| (src, r));
        let tx = report_tx.clone();
        threads.push(in_link(cfg, ranks, src, REPORTS, tx, decode, &failed_link));
    }
    threads.extend(links.0.into_iter().chain(links.1));
    Ok(Engine::Threads {
        firsts,
        reports,
        threads,
    })
}

/// Every rank but 0: builds the pipeline's stages as rank 0 does, keeps its own (replica
/// r's stage s for rank r·K + s) and runs it until the coordinator closes the chain. Returns
/// an error naming the rank and the operation when a link breaks or the stage fails.
pub fn serve(cfg: &StagedConfig, ranks: &Ranks) -> Result<()> {
    let k = cfg.plan.len();
    ranks.check(k)?;
    let me = ranks.rank();
    if me == 0 {
        return Err(RuntimeError::Config(
            "rank 0 is the coordinator; it does not serve a stage".into(),
        ));
    }
    let (replica, s) = (me / k, me % k);
    // `ranks.check` made sure this rank's stage is one of the plan's.
    let runner = build_runners(cfg)?.swap_remove(s);
    let (fail_tx, fail_rx) = crossbeam_channel::unbounded::<String>();
    let on_fail = move |_peer: usize, cause: String| {
        let _ = fail_tx.send(cause);
    };
    let (up_tx, upstream) = channel(cfg);
    let (report_tx, report_rx) = crossbeam_channel::unbounded::<Filed>();
    let src = if s == 0 { 0 } else { me - 1 };
    let reports_out = out_link(ranks, 0, REPORTS, report_rx, report_frame, &on_fail);
    let down_in = in_link(cfg, ranks, src, DOWN, up_tx, frame_message, &on_fail);
    let mut links = (vec![reports_out], vec![down_in]);
    let chain = (upstream, report_tx);
    let stage = run_linked_stage(cfg, ranks, runner, s, chain, &on_fail, &mut links);
    // Only the links hold the failure channel now: it closes when they have all ended.
    drop(on_fail);
    tracing::info!(rank = me, replica, stage = s + 1, "serving");
    // Whichever ends first: the stage (normally, when the coordinator closes the chain), a
    // link (a peer died), or rank 0 (gone while this rank's links wait on channels): stop
    // now, even if the stage is stuck.
    let cause = loop {
        crossbeam_channel::select! {
            recv(stage.exited) -> cause => break cause.unwrap_or(None),
            recv(fail_rx) -> link => match link {
                Ok(e) => return Err(RuntimeError::Link(e)),
                // Every link ended cleanly; the stage follows.
                Err(_) => break stage.exited.recv().unwrap_or(None),
            },
            default(Duration::from_secs(1)) => {
                if let Some(alive) = &ranks.liveness {
                    alive().map_err(RuntimeError::Link)?;
                }
            }
        }
    };
    // A link that failed closed the stage's input, so the stage may have ended as if the
    // coordinator had closed it: the link's failure (sent before it closed) is the cause.
    if let Ok(e) = fail_rx.try_recv() {
        return Err(RuntimeError::Link(e));
    }
    if let Some(cause) = cause {
        let device = ranks.names.get(me).cloned();
        return Err(RuntimeError::Stage {
            stage: s + 1,
            device: device.unwrap_or_else(|| format!("rank {me}")),
            module: None,
            cause,
        });
    }
    // The stage closed its outputs: let the links send their stop frames.
    for t in links.0 {
        let _ = t.thread.join();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip_message(m: Message) -> Message {
        let f = message_frame(m).unwrap();
        // What the wire keeps: header numbers and CPU tensors.
        frame_message(f).unwrap()
    }

    #[test]
    fn frames_keep_messages_and_reports() {
        let x = Tensor::randn([3, 2, 4], (Kind::Float, Device::Cpu));
        let p = Tensor::rand([3, 10], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[1i64, 2, 3]);
        let m = round_trip_message(Message::Train {
            tag: Tag::new(7, 1),
            micro_batches: 2,
            input: x.shallow_clone(),
            p: p.shallow_clone(),
            labels: y.shallow_clone(),
            scale: 0.375,
        });
        let Message::Train {
            tag,
            micro_batches,
            input,
            labels,
            scale,
            ..
        } = m
        else {
            panic!("not a training message")
        };
        assert_eq!(
            (tag.step, tag.micro, micro_batches, scale),
            (7, 1, 2, 0.375)
        );
        assert!(input.equal(&x) && labels.equal(&y));

        let named = vec![("a.w".to_string(), x.shallow_clone())];
        let f = report_frame((0, Report::State(named))).unwrap();
        let Report::State(state) = frame_report(f).unwrap() else {
            panic!("not a state report")
        };
        assert_eq!(state[0].0.as_str(), "a.w");
        assert!(state[0].1.equal(&x));

        let failure = Failure {
            module: Some(4),
            cause: "boom".into(),
        };
        let f = report_frame((1, Report::Failed(failure))).unwrap();
        let Report::Failed(Failure { module, cause }) = frame_report(f).unwrap() else {
            panic!("not a failure")
        };
        assert_eq!((module, cause.as_str()), (Some(4), "boom"));
    }
}
