//! The time a call has used of its processor's `timeout`: the slices it ran and its
//! waits in host calls, but not the time it sat queued while other messages ran.
//!
//! Messages in flight interleave on the consumer's threads: the epoch callback makes
//! a running plugin yield at every tick so its neighbours get a turn. Wall time would
//! charge each message for those turns, and a CPU-heavy message would time out
//! because of its neighbours. So [`CallClock::meter`] wraps the call's future and
//! counts the time spent inside its `poll`. When the call returns `Pending`, either
//! its waker was already woken during the poll (wasmtime's yield wakes its own task
//! before suspending: from then on the call waits for the executor, which does not
//! count), or it waits on the host (a WASI sleep, say), which counts until the host
//! wakes it; a timer armed for what is left of the budget ends a wait that would
//! outlast it. The epoch callback reads the same clock to interrupt running code.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use tokio::time::Sleep;

/// Stands for "no instant" in the atomic timestamps below.
const NEVER: u64 = u64::MAX;

/// The call ran out of its budget while the host held it (in a host call, or between
/// epoch ticks), so no trap reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget;

/// One call's budget and what it has used, shared by the metering future and the
/// store's epoch callback (hence atomics: the callback only gets the store's data).
/// It is also the waker the metered call sees, which notes when it was woken.
#[derive(Debug)]
pub struct CallClock {
    budget: Duration,
    /// Timestamps below are nanoseconds since this instant.
    origin: Instant,
    /// Time counted in finished polls and finished host waits, in nanoseconds.
    spent: AtomicU64,
    /// When the poll in progress began, or [`NEVER`] between polls.
    poll_began: AtomicU64,
    /// When the call was first woken since its last poll began, or [`NEVER`].
    woken_at: AtomicU64,
    /// The task polling the call, which a wake passes on to.
    task: Mutex<Option<Waker>>,
}

impl CallClock {
    pub fn new(budget: Duration) -> Arc<CallClock> {
        Arc::new(CallClock {
            budget,
            origin: Instant::now(),
            spent: AtomicU64::new(0),
            poll_began: AtomicU64::new(NEVER),
            woken_at: AtomicU64::new(NEVER),
            task: Mutex::new(None),
        })
    }

    /// The time counted so far, the poll in progress included.
    pub fn used(&self) -> Duration {
        let spent = self.spent.load(Ordering::Acquire);
        let began = self.poll_began.load(Ordering::Acquire);
        let running = match began {
            NEVER => 0,
            began => self.stamp(Instant::now()).saturating_sub(began),
        };
        Duration::from_nanos(spent.saturating_add(running))
    }

    /// True once the call has used its whole budget.
    pub fn exhausted(&self) -> bool {
        self.used() >= self.budget
    }

    /// Runs `call` against this clock's budget. One clock meters several futures in
    /// turn (a fresh instance's start functions, then `process`), which share the
    /// budget; never two at once.
    pub async fn meter<F: Future>(self: &Arc<Self>, call: F) -> Result<F::Output, OverBudget> {
        let mut call = pin!(call);
        let waker = Waker::from(self.clone());
        // Set while the call waits on the host: since when.
        let mut waiting_since: Option<Instant> = None;
        let mut timer: Option<Pin<Box<Sleep>>> = None;
        let result = poll_fn(|cx| {
            let began = Instant::now();
            if let Some(since) = waiting_since.take() {
                // The wait ended when the host woke the call (or now, when the timer
                // did): the time queued after that is the executor's.
                let woken = match self.woken_at.load(Ordering::Acquire) {
                    NEVER => began,
                    at => self.origin + Duration::from_nanos(at),
                };
                self.count(woken.saturating_duration_since(since));
            }
            if self.exhausted() {
                return Poll::Ready(Err(OverBudget));
            }
            self.arm(cx.waker());
            self.poll_began.store(self.stamp(began), Ordering::Release);
            let polled = call.as_mut().poll(&mut Context::from_waker(&waker));
            let ended = Instant::now();
            self.poll_began.store(NEVER, Ordering::Release);
            self.count(ended - began);
            match polled {
                Poll::Ready(output) => Poll::Ready(Ok(output)),
                Poll::Pending if self.exhausted() => Poll::Ready(Err(OverBudget)),
                Poll::Pending if self.woken_at.load(Ordering::Acquire) != NEVER => Poll::Pending,
                Poll::Pending => {
                    waiting_since = Some(ended);
                    let deadline = ended + self.budget.saturating_sub(self.used());
                    let timer =
                        timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::ZERO)));
                    timer.as_mut().reset(deadline.into());
                    if timer.as_mut().poll(cx).is_ready() {
                        cx.waker().wake_by_ref();
                    }
                    Poll::Pending
                }
            }
        })
        .await;
        // A clock outlives its call in a warm instance: it should not keep the task.
        *self.task.lock().unwrap_or_else(|p| p.into_inner()) = None;
        result
    }

    fn count(&self, time: Duration) {
        let nanos = u64::try_from(time.as_nanos()).unwrap_or(NEVER - 1);
        self.spent.fetch_add(nanos, Ordering::AcqRel);
    }

    fn stamp(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(NEVER - 1)
    }

    /// Before each poll: not woken yet, and a wake goes to the task polling now.
    fn arm(&self, task: &Waker) {
        self.woken_at.store(NEVER, Ordering::Release);
        let mut current = self.task.lock().unwrap_or_else(|p| p.into_inner());
        if !current.as_ref().is_some_and(|w| w.will_wake(task)) {
            *current = Some(task.clone());
        }
    }
}

/// The waker of the metered call: notes when it was first woken since its last poll
/// began (when a host wait ended), then wakes the task.
impl Wake for CallClock {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let now = self.stamp(Instant::now());
        let _ = self
            .woken_at
            .compare_exchange(NEVER, now, Ordering::AcqRel, Ordering::Acquire);
        if let Some(task) = self.task.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            task.wake_by_ref();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps the thread busy for `time`, as a plugin computing would.
    fn busy(time: Duration) {
        let start = Instant::now();
        while start.elapsed() < time {
            std::hint::spin_loop();
        }
    }

    /// Yields as wasmtime does at an epoch tick: wakes its own task, then suspends.
    /// (tokio's `yield_now` defers the wake until the scheduler next looks at its
    /// driver, which would make the queueing look like a host wait.)
    async fn yield_like_wasmtime() {
        let mut yielded = false;
        poll_fn(|cx| {
            if yielded {
                return Poll::Ready(());
            }
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    }

    /// Runs `slices` slices of `slice` each, yielding between them as wasmtime does.
    async fn compute(slices: u32, slice: Duration) {
        for _ in 0..slices {
            busy(slice);
            yield_like_wasmtime().await;
        }
    }

    #[tokio::test]
    async fn time_queued_behind_other_work_does_not_count() {
        let slice = Duration::from_millis(25);
        let clock = CallClock::new(Duration::from_secs(10));
        let started = Instant::now();
        let neighbour = tokio::spawn(compute(4, slice));
        clock.meter(compute(4, slice)).await.unwrap();
        neighbour.await.unwrap();
        let (used, wall) = (clock.used(), started.elapsed());
        assert!(used >= 4 * slice, "{used:?} counted for 100 ms of work");
        assert!(
            used < wall * 3 / 4,
            "{used:?} counted of {wall:?}: the neighbour's turns count too"
        );
    }

    #[tokio::test]
    async fn host_waits_count_and_end_at_the_budget() {
        let clock = CallClock::new(Duration::from_millis(300));
        clock
            .meter(tokio::time::sleep(Duration::from_millis(50)))
            .await
            .unwrap();
        assert!(
            clock.used() >= Duration::from_millis(50),
            "{:?}",
            clock.used()
        );

        let clock = CallClock::new(Duration::from_millis(50));
        let started = Instant::now();
        let slept = clock
            .meter(tokio::time::sleep(Duration::from_secs(10)))
            .await;
        assert_eq!(slept, Err(OverBudget));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn metered_futures_on_one_clock_share_its_budget() {
        let clock = CallClock::new(Duration::from_millis(100));
        clock
            .meter(compute(1, Duration::from_millis(60)))
            .await
            .unwrap();
        let second = clock.meter(compute(100, Duration::from_millis(10))).await;
        assert_eq!(second, Err(OverBudget));
        let used = clock.used();
        assert!(
            used >= Duration::from_millis(100) && used < Duration::from_millis(200),
            "{used:?}"
        );
    }
}
