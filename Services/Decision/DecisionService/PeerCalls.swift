import Contracts
import RPC
import Synchronization

/// A circuit breaker for one peer: after `failures` failed calls in a row the peer is
/// skipped for `cooldown`, so that a peer that is down or slow costs Decide nothing;
/// then one call is let through, and a success closes the breaker again.
final class Breaker: Sendable {
    let name: String
    let threshold: Int
    let cooldown: Duration
    private let state = Mutex<(failures: Int, openUntil: ContinuousClock.Instant?)>((0, nil))

    init(name: String, failures: Int, cooldown: Duration) {
        self.name = name
        self.threshold = max(1, failures)
        self.cooldown = cooldown
    }

    /// Nil when a call may be made; else why not.
    func refusal() -> String? {
        state.withLock { state in
            guard let until = state.openUntil else { return nil }
            let now = ContinuousClock.now
            guard now < until else {
                state.openUntil = now + cooldown  // half-open: this caller probes, the others wait
                return nil
            }
            return "\(name): skipped, \(state.failures) calls in a row failed (retrying within \(cooldown))"
        }
    }

    func record(success: Bool) {
        state.withLock { state in
            if success {
                state = (0, nil)
            } else {
                state.failures += 1
                if state.failures >= threshold { state.openUntil = ContinuousClock.now + cooldown }
            }
        }
    }
}

/// Calls a peer within a budget and turns every failure into a reason for a degraded answer.
enum PeerCall {
    enum Result<Output> {
        case answered(Output)
        /// The peer answered NOT_FOUND: it does not know the person (not a failure).
        case unknown
        /// The peer answered INVALID_ARGUMENT: the request was wrong, the peer is well.
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
        if let refusal = breaker.refusal() { return .failed(refusal) }
        let budget = min(timeout, ContinuousClock.now.duration(to: deadline))
        guard budget > .milliseconds(1) else { return .failed("\(breaker.name): no time left in the deadline") }
        do {
            let output = try await client.call(method, request, timeout: budget)
            breaker.record(success: true)
            return .answered(output)
        } catch {
            switch error.code {
            case .notFound:
                breaker.record(success: true)
                return .unknown
            case .invalidArgument:
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
