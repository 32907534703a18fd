import Contracts
import Logging
import RPC
import ServiceLifecycle
import Synchronization

/// Sends what is due from the outbox, `dispatchConcurrency` at a time: each attempt's
/// result is committed before the delivery is looked at again, so a crash at any moment
/// leaves every accepted delivery scheduled or sent (at least once; receivers discard
/// duplicates by idempotency key). Failures back off exponentially with jitter, then fall
/// back along the channel chain, then dead-letter. On graceful shutdown it stops taking
/// new work and finishes what is in flight.
public struct Dispatcher: Service {
    let store: RoutingStore
    let adapters: Adapters
    let configuration: RoutingConfiguration
    /// Where consent is read again before a send (`consentRecheckAfterMs`); nil: never.
    let profile: RPCClient?
    let logger: Logger
    let clock: @Sendable () -> Int64
    let consentReadFailures = FailureCount()

    init(store: RoutingStore, adapters: Adapters, configuration: RoutingConfiguration, profile: RPCClient?, logger: Logger,
         clock: @escaping @Sendable () -> Int64) {
        self.store = store
        self.adapters = adapters
        self.configuration = configuration
        self.profile = profile
        self.logger = logger
        self.clock = clock
    }

    public func run() async throws {
        let limit = configuration.dispatchConcurrency
        let poll = Duration.milliseconds(configuration.dispatchPollMs)
        await withTaskGroup(of: String?.self) { group in
            var inFlight: Set<String> = []
            // One attempt per person at a time, so that each send is judged (consent, caps)
            // after the person's previous one was recorded: a backlog's deliveries for one
            // person (after an outage) would otherwise all pass the caps together. The reads
            // leave those persons out.
            var persons: [String: String] = [:]  // delivery in flight → its person
            var ticking = false
            var failures = 0
            var polled = false
            while !Task.isCancelled && !Task.isShuttingDownGracefully {
                // Look again when half the slots are free, or on each tick: not once per
                // finished attempt.
                if inFlight.count <= limit / 2 || (polled && inFlight.count < limit) {
                    polled = false
                    do {
                        let now = clock()
                        var busy = Set(persons.values)
                        let due = try store.due(nowMs: now, limit: limit - inFlight.count, excluding: inFlight,
                                                skipping: adapters.heldChannels(nowMs: now), busy: busy)
                        failures = 0
                        for delivery in due {
                            guard busy.insert(delivery.personId).inserted else { continue }  // the next read
                            let adapter = adapters.adapter(for: delivery.channel)?.name
                            let admission = adapter.map { adapters.breakers.admit($0, nowMs: now) } ?? .send
                            let probe: Int?
                            switch admission {
                            case .wait:  // its circuit opened meanwhile, or a probe is out
                                busy.remove(delivery.personId)
                                continue
                            case .probe(let token): probe = token
                            case .send: probe = nil
                            }
                            inFlight.insert(delivery.deliveryId)
                            persons[delivery.deliveryId] = delivery.personId
                            group.addTask { await attempt(delivery, probe: probe); return delivery.deliveryId }
                        }
                    } catch {
                        failures += 1
                        if failures == 1 || failures % 100 == 0 { logger.error("outbox unreadable", metadata: ["error": "\(error)"]) }
                    }
                }
                if !ticking {
                    ticking = true
                    group.addTask { try? await Task.sleep(for: poll); return nil }
                }
                switch await group.next() {
                case let id??:
                    inFlight.remove(id)
                    persons.removeValue(forKey: id)
                case .some(nil):
                    ticking = false
                    polled = true
                case nil: break
                }
            }
            for await _ in group {}
        }
    }

    /// One attempt on the delivery's current channel, and its result recorded; first the
    /// delivery is judged again with what was learned since it was planned, the profile's
    /// consent included once the plan is `consentRecheckAfterMs` old. `probe`: the token of
    /// the one delivery sent while its adapter's circuit is open (`CircuitBreakers`).
    func attempt(_ planned: RoutingV1.Delivery, probe admitted: Int? = nil) async {
        var probe = admitted
        let plannedAdapter = adapters.adapter(for: planned.channel)?.name
        func releaseProbe() { if let probe, let plannedAdapter { adapters.breakers.release(plannedAdapter, token: probe) } }
        let delivery: RoutingV1.Delivery
        do {
            let consent = await consentNow(planned)
            guard let ready = try store.beforeSending(planned, consent: consent, nowMs: clock()) else {
                releaseProbe()
                return
            }
            delivery = ready
        } catch {
            // Not judged: the delivery stays due and is looked at again.
            logger.error("cannot check a delivery before sending it", metadata: ["delivery": "\(planned.deliveryId)", "error": "\(error)"])
            releaseProbe()
            return
        }
        let adapter = adapters.adapter(for: delivery.channel)
        if adapter?.name != plannedAdapter {
            // Judged again, it fell back to a channel of another adapter (or of none): that
            // one's circuit decides.
            releaseProbe()
            probe = nil
            if let adapter {
                switch adapters.breakers.admit(adapter.name, nowMs: clock()) {
                case .wait: return  // due on its new channel, it goes once the circuit lets it
                case .probe(let token): probe = token
                case .send: break
                }
            }
        }
        let result: RoutingStore.SendResult
        var counted = true
        if let adapter {
            result = await adapter.send(delivery)
            var retryAfterMs: Int64?
            if case .transient(_, let after) = result { retryAfterMs = after }
            let (wasProbe, transition) = adapters.breakers.record(adapter.name, probe: probe, transient: result.isTransient,
                                                                  retryAfterMs: retryAfterMs, nowMs: clock())
            counted = !(wasProbe && result.isTransient)
            switch transition {
            case .opened(let failures, let ms)?:
                logger.warning("circuit open: deliveries wait", metadata: ["adapter": "\(adapter.name)", "failures_in_a_row": "\(failures)", "probe_in_ms": "\(ms)", "error": "\(result)"])
            case .reopened(let ms)?:
                logger.warning("circuit still open: the probe failed", metadata: ["adapter": "\(adapter.name)", "probe_in_ms": "\(ms)", "error": "\(result)"])
            case .closed?:
                logger.notice("circuit closed: deliveries go again", metadata: ["adapter": "\(adapter.name)"])
            case nil:
                break
            }
        } else {
            result = .permanent("no adapter configured for \(delivery.channel)")
        }
        let exponent = min(Int(delivery.attempts), 30)
        let ceiling = min(Double(configuration.maxBackoffMs), Double(configuration.initialBackoffMs) * Double(1 << exponent))
        var backoff = Int64(ceiling / 2 + Double.random(in: 0...(ceiling / 2)))  // "equal jitter": never near zero
        if case .transient(_, let after?) = result { backoff = min(Int64(configuration.maxBackoffMs), max(backoff, after)) }
        let update = RoutingStore.Update(deliveryID: delivery.deliveryId, channel: delivery.channel, result: result, atMs: clock(),
                                         backoffMs: backoff, counted: counted)
        // Until the result is recorded the delivery stays in flight, so it is not sent again:
        // a store that cannot write (a full disk) holds the sends back instead of repeating
        // them every poll. Saving is retried, from 100 ms up to every 5 s; should the service
        // stop first, the delivery is still due and goes again after the restart (at least once).
        var wait = Duration.milliseconds(100)
        var failures = 0
        while true {
            do {
                if let updated = try await store.record(update), updated.state == .deadLetter {
                    logger.warning("dead letter", metadata: ["delivery": "\(updated.deliveryId)", "error": "\(updated.lastError)"])
                }
                return
            } catch {
                failures += 1
                if failures == 1 || failures % 100 == 0 {
                    logger.error("cannot record a delivery attempt; retrying", metadata: ["delivery": "\(delivery.deliveryId)", "error": "\(error)", "failures": "\(failures)"])
                }
            }
            guard !Task.isCancelled && !Task.isShuttingDownGracefully else { return }
            try? await Task.sleep(for: wait)
            wait = min(wait * 2, .seconds(5))
        }
    }
}

extension Dispatcher {
    /// The person's consent and traits (for the address) from the profile service, read
    /// again unless the plan is recent.
    func consentNow(_ d: RoutingV1.Delivery) async -> RoutingStore.SendTimeConsent {
        guard let profile, clock() - d.createdAtMs >= Int64(configuration.consentRecheckAfterMs) else { return .notRead }
        var request = ProfileV1.GetProfileRequest()
        var person = CommonV1.PersonRef()
        person.ref = .personId(d.personId)
        request.person = person
        request.fields = ["consent", "traits"]
        do {
            let view = try await profile.call(ProfileV1.Profile.getProfile, request, timeout: .milliseconds(configuration.profileTimeoutMs))
            consentReadFailures.count.store(0, ordering: .relaxed)  // the next outage's first failure is logged
            return .read(view.consent, traits: Planner.traits(view))
        } catch where error.code == .notFound {
            return .personUnknown(error.message)
        } catch {
            // Each waiting delivery tries again every initialBackoffMs: the first failure and
            // every hundredth are logged, not each one.
            let failures = consentReadFailures.count.add(1, ordering: .relaxed).newValue
            if failures == 1 || failures % 100 == 0 {
                logger.warning("cannot read consent again before sending; deliveries wait",
                               metadata: ["delivery": "\(d.deliveryId)", "error": "\(error)", "failures": "\(failures)"])
            }
            return .unreadable("profile: \(error.code) \(error.message)")
        }
    }
}

/// Failed consent reads since the dispatcher started (for logging them sparingly).
final class FailureCount: Sendable {
    let count = Atomic<Int>(0)
}

/// Owns the adapters' connections: closes them once the service group shuts down. Listed
/// before the dispatcher, so that it stops after the dispatcher finished what was in flight.
struct AdapterLifetime: Service {
    let adapters: Adapters

    func run() async throws {
        try? await gracefulShutdown()
        await adapters.shutdown()
    }
}

/// Passes unsubscribes and complaints recorded here on to the profile service as denied
/// consent, until it has confirmed each (the routing service honours them at once either way).
public struct ConsentRevoker: Service {
    let store: RoutingStore
    let profile: RPCClient
    let logger: Logger
    let interval: Duration

    init(store: RoutingStore, profile: RPCClient, logger: Logger, interval: Duration = .seconds(1)) {
        self.store = store
        self.profile = profile
        self.logger = logger
        self.interval = interval
    }

    public func run() async throws {
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            _ = await syncOnce()
            try? await Task.sleep(for: interval)
        }
    }

    /// Sends every unsynced opt-out; returns how many the profile service confirmed. Stops at
    /// the first that failed for a reason worth retrying (the profile service is down).
    func syncOnce() async -> Int {
        guard let pending = try? store.unsyncedOptOuts(limit: 100) else { return 0 }
        var done = 0
        for optOut in pending {
            if await Self.revoke(optOut, profile: profile, store: store, logger: logger) { done += 1 } else { break }
        }
        return done
    }

    /// Answers the profile service gives a request it will never accept: retrying one would
    /// hold every later opt-out behind it. RESOURCE_EXHAUSTED is a limit (a person at the
    /// most consent pairs the profile service keeps), not a load to wait out.
    static let refusals: Set<RPCError.Code> = [.invalidArgument, .failedPrecondition, .outOfRange, .resourceExhausted]

    /// SetConsent(denied) for one opt-out; true once the profile service recorded it.
    static func revoke(_ optOut: RoutingStore.OptOut, profile: RPCClient, store: RoutingStore, logger: Logger) async -> Bool {
        var record = ProfileV1.ConsentRecord()
        record.purpose = optOut.purpose
        record.channel = optOut.channel
        record.granted = false
        record.source = optOut.source
        record.atMs = optOut.atMs
        var request = ProfileV1.SetConsentRequest()
        var person = CommonV1.PersonRef()
        person.ref = .personId(optOut.person)
        request.person = person
        request.consents = [record]
        do {
            _ = try await profile.call(ProfileV1.Profile.setConsent, request, timeout: .seconds(5))
        } catch where refusals.contains(error.code) {
            // Never accepted: given up, so that it holds no later one back (this service
            // still honours it).
            logger.error("profile refused a consent revocation; not retried", metadata: ["person": "\(optOut.person)", "error": "\(error)"])
        } catch {
            // A person the profile service no longer has cannot be contacted anyway.
            guard error.code == .notFound else {
                logger.warning("profile did not record a consent revocation; will retry", metadata: ["error": "\(error)"])
                return false
            }
        }
        try? store.markSynced(optOut)
        return true
    }
}
