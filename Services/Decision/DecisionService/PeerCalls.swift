import Contracts
import RPC
import Synchronization

/// A circuit breaker for one peer: after `failures` failed calls in a row the peer is
/// skipped for a while, so that a peer that is down or slow costs Decide nothing; then one
/// call is let through (a probe), and a success closes the breaker again. The first skip
/// lasts an eighth of `cooldown` and each failed probe doubles it, up to `cooldown`: a
/// stall of the peer shorter than that costs a short skip (under load every call in flight
/// fails together, so a stall of 100 ms opened the breaker for the whole cooldown: up to
/// a second of degraded decisions), and a peer that is down is probed once per
/// `cooldown` after a few doublings.
final class Breaker: Sendable {
    let name: String
    let threshold: Int
    let cooldown: Duration
    let clock: @Sendable () -> ContinuousClock.Instant
    private struct State {
        var failures = 0
        var openUntil: ContinuousClock.Instant?
        /// How long the current or last skip lasts (nil: closed since the last success).
        var skip: Duration?
        /// A probe is out: its failure opens the breaker again, for twice as long.
        var probing = false
    }
    private let state = Mutex(State())

    init(name: String, failures: Int, cooldown: Duration, clock: @escaping @Sendable () -> ContinuousClock.Instant = { .now }) {
        self.name = name
        self.threshold = max(1, failures)
        self.cooldown = cooldown
        self.clock = clock
    }

    /// Nil when a call may be made; else why not.
    func refusal() -> String? {
        state.withLock { state in
            guard let until = state.openUntil else { return nil }
            let now = clock()
            guard now < until else {
                // Half-open: this caller probes, the others are refused until it answers.
                state.openUntil = now + cooldown
                state.probing = true
                return nil
            }
            return "\(name): skipped, \(state.failures) calls in a row failed (retrying within \(state.skip ?? cooldown))"
        }
    }

    func record(success: Bool) {
        state.withLock { state in
            guard !success else {
                state = State()
                return
            }
            state.failures += 1
            // Calls in flight when it opened fail too: they neither reopen it nor lengthen the skip.
            guard state.failures >= threshold, state.openUntil == nil || state.probing else { return }
            let skip = state.probing ? min(cooldown, (state.skip ?? cooldown / 8) * 2) : cooldown / 8
            state.skip = skip
            state.openUntil = clock() + skip
            state.probing = false
        }
    }
}

/// Calls a peer within a budget and turns every failure into a reason for a degraded answer.
enum PeerCall {
    enum Result<Output> {
        case answered(Output)
        /// The peer answered NOT_FOUND: it does not know the person (not a failure).
        case unknown
        /// The peer answered INVALID_ARGUMENT or RESOURCE_EXHAUSTED: the request was wrong, or
        /// its answer too large; the peer is well.
        case rejected(RPCError)
        case failed(String)
    }

    /// How a peer's error reads among a degraded answer's reasons: `profile: UNAVAILABLE …`.
    static func reason(_ breaker: Breaker, _ error: RPCError) -> String { "\(breaker.name): \(error.code) \(error.message)" }

    static func call<Input, Output>(
        _ client: RPCClient?, _ breaker: Breaker, _ method: MethodDescriptor<Input, Output>, _ request: Input,
        deadline: ContinuousClock.Instant, timeout: Duration
    ) async -> Result<Output> {
        guard let client else { return .failed("\(breaker.name): not configured") }
        // The budget first: a caller that will not call must not take the breaker's probe
        // (the peer would then be skipped a whole cooldown with no probe made).
        let budget = min(timeout, ContinuousClock.now.duration(to: deadline))
        guard budget > .milliseconds(1) else { return .failed("\(breaker.name): no time left in the deadline") }
        if let refusal = breaker.refusal() { return .failed(refusal) }
        do {
            let output = try await client.call(method, request, timeout: budget)
            breaker.record(success: true)
            return .answered(output)
        } catch {
            switch error.code {
            case .notFound:
                breaker.record(success: true)
                return .unknown
            case .invalidArgument, .resourceExhausted:
                // The request was wrong, or its answer too large (a person whose profile
                // outgrew a message): the peer is well.
                breaker.record(success: true)
                return .rejected(error)
            default:
                break
            }
            breaker.record(success: false)
            return .failed(reason(breaker, error))
        }
    }
}
