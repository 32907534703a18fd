import Synchronization

/// A circuit per adapter (the webhook endpoint, the SMTP relay), so that an outage does not
/// spend the attempts of every delivery due meanwhile (six attempts span 15–31 s by default:
/// a two-minute outage would dead-letter them all).
///
/// After `threshold` transient failures in a row the circuit opens: the adapter's deliveries
/// stay in the outbox, untried, for the cooldown. Then one delivery goes as a probe. A probe
/// that is sent, or refused for good (the endpoint answered), closes the circuit; one that
/// fails transiently opens it again for twice as long, up to `maxCooldownMs`. A probe's
/// transient failure is not counted against its delivery's attempts: it tells about the
/// endpoint, not the delivery. A failure's `Retry-After` lengthens the cooldown to it.
final class CircuitBreakers: Sendable {
    enum Admission: Equatable {
        /// The circuit is closed: send.
        case send
        /// The circuit was open and its cooldown is over: send this one alone, and report its
        /// result (or `release`) with this token.
        case probe(Int)
        /// Open, or a probe is out: leave the delivery in the outbox.
        case wait
    }

    /// What changed, for the log.
    enum Transition: Equatable {
        case opened(failures: Int, forMs: Int64)
        case reopened(forMs: Int64)
        case closed
    }

    private struct Circuit {
        var failures = 0
        var openUntilMs: Int64?
        var cooldownMs: Int64 = 0
        /// The token of the probe out, if any.
        var probe: Int?
    }

    let threshold: Int
    let initialCooldownMs: Int64
    let maxCooldownMs: Int64
    private let circuits = Mutex<(byAdapter: [String: Circuit], tokens: Int)>(([:], 0))

    /// `threshold` 0: circuits never open.
    init(threshold: Int, initialCooldownMs: Int64, maxCooldownMs: Int64) {
        self.threshold = threshold
        self.initialCooldownMs = initialCooldownMs
        self.maxCooldownMs = maxCooldownMs
    }

    /// The adapters whose deliveries must not be fetched now: open and cooling down, or with a probe out.
    func held(nowMs: Int64) -> Set<String> {
        circuits.withLock { state in
            Set(state.byAdapter.filter { _, c in c.openUntilMs.map { nowMs < $0 || c.probe != nil } ?? false }.keys)
        }
    }

    /// Whether a delivery on `adapter` may be sent now.
    func admit(_ adapter: String, nowMs: Int64) -> Admission {
        circuits.withLock { state in
            guard let circuit = state.byAdapter[adapter], let until = circuit.openUntilMs else { return .send }
            guard nowMs >= until, circuit.probe == nil else { return .wait }
            state.tokens += 1
            state.byAdapter[adapter]?.probe = state.tokens
            return .probe(state.tokens)
        }
    }

    /// The probe `token` was not sent after all (the delivery was no longer due): the next one may go.
    func release(_ adapter: String, token: Int) {
        circuits.withLock { state in
            if state.byAdapter[adapter]?.probe == token { state.byAdapter[adapter]?.probe = nil }
        }
    }

    /// An attempt's result on `adapter`; `probe`: its token when it went as a probe.
    /// `retryAfterMs`: what the endpoint asked for, if anything. Returns whether the attempt
    /// was this circuit's current probe (a probe's transient failure is not counted against
    /// its delivery), and what changed.
    func record(_ adapter: String, probe token: Int?, transient: Bool, retryAfterMs: Int64?, nowMs: Int64)
        -> (wasProbe: Bool, transition: Transition?) {
        guard threshold > 0 else { return (false, nil) }
        return circuits.withLock { state in
            var c = state.byAdapter[adapter] ?? Circuit()
            defer { state.byAdapter[adapter] = c }
            // A probe whose circuit was closed (and perhaps opened again) since it was admitted
            // counts as an ordinary attempt.
            let isProbe = token != nil && c.probe == token && c.openUntilMs != nil
            guard transient else {
                // The endpoint answered: it is up.
                let wasOpen = c.openUntilMs != nil
                c = Circuit()
                return (isProbe, wasOpen ? .closed : nil)
            }
            c.failures += 1
            if isProbe {
                c.probe = nil
                c.cooldownMs = min(maxCooldownMs, max(initialCooldownMs, 2 * c.cooldownMs, retryAfterMs ?? 0))
                c.openUntilMs = nowMs + c.cooldownMs
                return (true, .reopened(forMs: c.cooldownMs))
            }
            guard c.openUntilMs == nil, c.failures >= threshold else { return (false, nil) }
            c.cooldownMs = min(maxCooldownMs, max(initialCooldownMs, retryAfterMs ?? 0))
            c.openUntilMs = nowMs + c.cooldownMs
            return (false, .opened(failures: c.failures, forMs: c.cooldownMs))
        }
    }
}
