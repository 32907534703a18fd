import NIOCore

/// The deadlines of one connection's calls in flight, earliest first, behind one timer on the
/// connection's event loop. A call arms no timer of its own: a timer per call (scheduled, then
/// cancelled when the answer came, nearly always first) was about a tenth of the CPU of a call
/// through the client and the server.
///
/// The timer is armed for the earliest deadline and is not moved when that call finishes:
/// when it fires, the owner drops the finished calls (`popDue` returns every id due, finished
/// or not) and the timer is armed again for the earliest call still waiting. Calls mostly
/// finish in the order they started, so `dropFinished` keeps the queue about as long as the
/// calls in flight.
struct DeadlineQueue {
    private var entries: [(deadline: ContinuousClock.Instant, id: UInt32)] = []
    private var head = 0
    /// The timer, and the deadline it is armed for.
    private var armed: (timer: Scheduled<Void>, at: ContinuousClock.Instant)?

    var isEmpty: Bool { head == entries.count }
    var count: Int { entries.count - head }

    /// Adds a call. Deadlines usually arrive in order (one timeout per client), so the place
    /// is found from the end.
    mutating func add(_ id: UInt32, deadline: ContinuousClock.Instant) {
        var at = entries.count
        while at > head, entries[at - 1].deadline > deadline { at -= 1 }
        entries.insert((deadline, id), at: at)
    }

    /// Removes the ids due at `now` (deadline reached), earliest first.
    mutating func popDue(now: ContinuousClock.Instant) -> [UInt32] {
        var due: [UInt32] = []
        while head < entries.count, entries[head].deadline <= now {
            due.append(entries[head].id)
            head += 1
        }
        compact()
        return due
    }

    /// Drops the calls at the front that have finished (`isPending` false), and all finished
    /// calls once they outnumber the `pending` ones (a slow call at the front would otherwise
    /// keep every later one's entry until it ends).
    mutating func dropFinished(pending: Int, _ isPending: (UInt32) -> Bool) {
        while head < entries.count, !isPending(entries[head].id) { head += 1 }
        if count > 2 * pending + 64 {
            entries = entries[head...].filter { isPending($0.id) }
            head = 0
        }
        compact()
    }

    private mutating func compact() {
        if head == entries.count {
            entries.removeAll(keepingCapacity: true)
            head = 0
        } else if head >= 64, head * 2 >= entries.count {
            entries.removeFirst(head)
            head = 0
        }
    }

    /// Arms the timer for the earliest deadline unless it is armed for that or earlier.
    /// `fire` runs on `loop` when it goes off; it should `popDue`, then `arm` again.
    mutating func arm(on loop: any EventLoop, _ fire: @escaping @Sendable () -> Void) {
        guard head < entries.count else { return }
        let earliest = entries[head].deadline
        if let armed, armed.at <= earliest { return }
        armed?.timer.cancel()
        let delay = TimeAmount.nanoseconds(max(0, ContinuousClock.now.duration(to: earliest).nanoseconds))
        armed = (loop.scheduleTask(in: delay, fire), earliest)
    }

    /// Called first thing when the timer fires: it is no longer armed.
    mutating func fired() {
        armed = nil
    }

    /// Cancels the timer and forgets every call (the connection is gone).
    mutating func removeAll() {
        armed?.timer.cancel()
        armed = nil
        entries.removeAll()
        head = 0
    }
}
