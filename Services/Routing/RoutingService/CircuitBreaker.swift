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
        /// The circuit was open and its cooldown is over: send this one alone.
        case probe
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
        var probing = false
    }

    let threshold: Int
    let initialCooldownMs: Int64
    let maxCooldownMs: Int64
    private let circuits = Mutex<[String: Circuit]>([:])

    /// `threshold` 0: circuits never open.
    init(threshold: Int, initialCooldownMs: Int64, maxCooldownMs: Int64) {
        self.threshold = threshold
        self.initialCooldownMs = initialCooldownMs
        self.maxCooldownMs = maxCooldownMs
    }

    /// The adapters whose deliveries must not be fetched now: open and cooling down, or with a probe out.
    func held(nowMs: Int64) -> Set<String> {
        circuits.withLock { circuits in
            Set(circuits.filter { _, c in c.openUntilMs.map { nowMs < $0 || c.probing } ?? false }.keys)
        }
    }

    /// Whether a delivery on `adapter` may be sent now.
    func admit(_ adapter: String, nowMs: Int64) -> Admission {
        circuits.withLock { circuits in
            guard let until = circuits[adapter]?.openUntilMs else { return .send }
            guard nowMs >= until, circuits[adapter]?.probing == false else { return .wait }
            circuits[adapter]?.probing = true
            return .probe
        }
    }

    /// A probe admitted but not sent (the delivery was no longer due): the next one may go.
    func release(_ adapter: String) {
        circuits.withLock { $0[adapter]?.probing = false }
    }

    /// An attempt's result on `adapter`. `retryAfterMs`: what the endpoint asked for, if anything.
    func record(_ adapter: String, probe: Bool, transient: Bool, retryAfterMs: Int64?, nowMs: Int64) -> Transition? {
        guard threshold > 0 else { return nil }
        return circuits.withLock { circuits in
            var c = circuits[adapter] ?? Circuit()
            defer { circuits[adapter] = c }
            guard transient else {
                let wasOpen = c.openUntilMs != nil
                c = Circuit()
                return wasOpen ? .closed : nil
            }
            c.failures += 1
            if probe {
                c.probing = false
                c.cooldownMs = min(maxCooldownMs, max(2 * c.cooldownMs, retryAfterMs ?? 0))
                c.openUntilMs = nowMs + c.cooldownMs
                return .reopened(forMs: c.cooldownMs)
            }
            guard c.openUntilMs == nil, c.failures >= threshold else { return nil }
            c.cooldownMs = min(maxCooldownMs, max(initialCooldownMs, retryAfterMs ?? 0))
            c.openUntilMs = nowMs + c.cooldownMs
            return .opened(failures: c.failures, forMs: c.cooldownMs)
        }
    }
}
