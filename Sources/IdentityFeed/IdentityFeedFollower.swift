import Contracts
import Dispatch
import Logging
import RPC
import ServiceLifecycle

/// A change in the identity graph that a service keeping per-person data must apply.
public enum IdentityChange: Sendable, Equatable {
    /// `sources` were merged into `target`.
    case merge(target: String, sources: [String])
    /// `split` was split off `survivor` again.
    case unmerge(survivor: String, split: String)
    /// `person` (and every person it had absorbed) no longer exists: erase it.
    case erase(person: String, absorbed: [String])
    /// Anything else (a link, an identifier erased from a living person).
    case other
}

/// `person` after the merges and erasures a store noted: `next` gives the person one was
/// merged into, "" when erased, nil when neither. Returns the last of the chain, or nil when
/// it ends in an erasure. Chains are as long as the merges that made them (no cycle is
/// stored); past 64 hops the person reached is returned.
public func survivor(of person: String, next: (String) -> String?) -> String? {
    var person = person
    for _ in 0..<64 {
        guard let following = next(person) else { return person }
        if following.isEmpty { return nil }
        person = following
    }
    return person
}

/// A store that applies identity changes. `apply` must store the position with the
/// changes, in one transaction, so that a restart neither skips nor repeats one.
public protocol IdentityChangeSink: Sendable {
    /// The `seq` of the last change applied (0: none).
    func identityCursor() throws -> Int64
    func apply(_ changes: [(seq: Int64, change: IdentityChange)], nowMs: Int64) throws
}

/// Follows the identity service's change feed (ListChanges) and hands merges, unmerges
/// and erasures to a store. Pull-based and resumable from the store's own cursor.
public struct IdentityFeedFollower<Sink: IdentityChangeSink>: Service {
    let store: Sink
    let identity: RPCClient
    let logger: Logger
    let pollInterval: Duration
    /// How long a call to the identity service may take: a peer that hangs, or a connection
    /// lost without a word, would otherwise stop every later merge and erasure. A call that
    /// times out is retried with the follower's backoff. Default 10 s.
    let callTimeout: Duration
    let clock: @Sendable () -> Int64
    /// Where `apply` runs: a merge recomputes features from every event of the persons
    /// involved and an erasure may wait seconds for a checkpoint, which must not hold one of
    /// the few threads of Swift's cooperative pool that the service's calls run on.
    let applier = DispatchQueue(label: "arbiter.identity-feed.apply")

    public init(store: Sink, identity: RPCClient, logger: Logger, pollInterval: Duration = .seconds(1),
                callTimeout: Duration = .seconds(10), clock: @escaping @Sendable () -> Int64) {
        self.store = store
        self.identity = identity
        self.logger = logger
        self.pollInterval = pollInterval
        self.callTimeout = callTimeout
        self.clock = clock
    }

    public func run() async throws {
        var failures = 0
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            do {
                let applied = try await pollOnce()
                failures = 0
                // The sleeps end at a graceful shutdown (the backoff is up to 10 s).
                if applied == 0 { try? await cancelWhenGracefulShutdown { [pollInterval] in try await Task.sleep(for: pollInterval) } }
            } catch is CancellationError {
                return
            } catch {
                failures += 1
                let count = failures
                if count == 1 || count % 60 == 0 {
                    logger.warning("identity change feed unavailable; retrying", metadata: ["error": "\(error)", "failures": "\(count)"])
                }
                let backoff = pollInterval * min(failures, 10)
                try? await cancelWhenGracefulShutdown { try await Task.sleep(for: backoff) }
            }
        }
    }

    /// Fetches and applies the next page of changes; returns how many were applied.
    @discardableResult
    public func pollOnce(limit: UInt32 = 500) async throws -> Int {
        var request = IdentityV1.ListChangesRequest()
        request.afterSeq = UInt64(try store.identityCursor())
        request.limit = limit
        let response = try await identity.call(IdentityV1.Identity.listChanges, request, timeout: callTimeout)
        var changes: [(seq: Int64, change: IdentityChange)] = []
        for change in response.changes {
            let kind: IdentityChange
            switch change.kind {
            case .merge: kind = .merge(target: change.targetPersonId, sources: change.sourcePersonIds)
            case .unmerge: kind = change.sourcePersonIds.first.map { .unmerge(survivor: change.targetPersonId, split: $0) } ?? .other
            case .erase:
                // An erasure of one identifier leaves its person alive. The change says so
                // (`identifier_only`); read afterwards, the person may have been erased since
                // (taking that change for the person's erasure deleted events an unmerge
                // between the two was to give back). An identity service older than that field
                // says nothing: then only a person it no longer has is erased here.
                let alive = if change.identifierOnly { true } else { try await personExists(change.targetPersonId) }
                kind = alive ? .other : .erase(person: change.targetPersonId, absorbed: change.sourcePersonIds)
            default: kind = .other
            }
            changes.append((Int64(change.seq), kind))
        }
        let (store, now, batch) = (self.store, clock(), changes)
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            applier.async { continuation.resume(with: Result { try store.apply(batch, nowMs: now) }) }
        }
        if let last = changes.last?.seq { logger.debug("applied identity changes", metadata: ["through": "\(last)"]) }
        return changes.count
    }

    func personExists(_ id: String) async throws -> Bool {
        var request = IdentityV1.GetPersonRequest()
        request.personId = id
        request.pageSize = 1  // whether it exists, not its identifiers
        do {
            _ = try await identity.call(IdentityV1.Identity.getPerson, request, timeout: callTimeout)
            return true
        } catch {
            if error.code == .notFound { return false }
            throw error
        }
    }
}
