import Contracts
import Foundation
import GRDB
import Logging
@testable import IdentityService
import RPC
import Synchronization
import TestSupport
import Testing

func tempDirectory() -> String { temporaryDirectory("identity-test") }

func id(_ type: String, _ value: String) -> CommonV1.Identifier {
    var identifier = CommonV1.Identifier()
    identifier.type = type
    identifier.value = value
    return identifier
}

/// A new directory holding an identity store migrated up to `migration` only, with `sql` run in it.
func storeBefore(_ migration: String, _ sql: String) async throws -> String {
    try storeMigrated(upTo: migration, by: IdentityStore.migrator, file: "identity.sqlite", prefix: "identity-test") { try $0.execute(sql: sql) }
}

func makeService(_ directory: String = tempDirectory(), rules: IdentityRules = IdentityRules(), key: [UInt8]? = nil,
                 erasureChunk: Int = IdentityStore.defaultErasureChunk) throws -> IdentityService {
    let clock = Mutex<Int64>(1_700_000_000_000)
    let store = try IdentityStore(directory: directory, normalizer: Normalizer(rules: rules, privacyKey: key), erasureChunk: erasureChunk)
    return IdentityService(store: store) {
        clock.withLock { now in
            now += 1000
            return now
        }
    }
}

/// The store file of `directory` opened directly, waiting for a closed service's checkpointer,
/// which may still hold it a moment.
func openStoreFile(_ directory: String) throws -> DatabaseQueue {
    var waiting = Configuration()
    waiting.busyMode = .timeout(30)
    return try DatabaseQueue(path: directory + "/identity.sqlite", configuration: waiting)
}

extension IdentityService {
    func link(_ identifiers: [CommonV1.Identifier], source: String = "test", at: Int64 = 0) async throws -> IdentityV1.LinkResponse {
        var request = IdentityV1.LinkRequest()
        request.identifiers = identifiers
        request.source = source
        request.observedAtMs = at
        return try await link(request)
    }

    func person(_ personID: String) async throws -> IdentityV1.Person {
        var request = IdentityV1.GetPersonRequest()
        request.personId = personID
        return try await getPerson(request)
    }

    func feed(after seq: UInt64 = 0) async throws -> IdentityV1.ListChangesResponse {
        var request = IdentityV1.ListChangesRequest()
        request.afterSeq = seq
        return try await listChanges(request)
    }
}

@Suite("identity: normalization")
struct NormalizationTests {
    let normalizer = Normalizer(rules: {
        var rules = IdentityRules()
        rules.defaultRegion = "NL"
        rules.customTypes = ["loyalty_card"]
        return rules
    }())

    @Test("values normalize per type", arguments: [
        ("email", "  Ada.Lovelace@Example.COM ", "ada.lovelace@example.com"),
        ("phone", "+31 6 1234 5678", "+31612345678"),
        ("phone", "0031-6-12345678", "+31612345678"),
        ("phone", "06 12 34 56 78", "+31612345678"),
        ("phone", "(020) 555 1234", "+31205551234"),
        // The trunk 0 written in an international number: one person, not two.
        ("phone", "+44 (0)20 7946 0000", "+442079460000"),
        ("phone", "+31 (0)6 1234 5678", "+31612345678"),
        ("phone", "+31 06 1234 5678", "+31612345678"),
        ("phone", "0044 020 7946 0000", "+442079460000"),
        ("phone", "+39 06 1234 5678", "+390612345678"),  // Italy keeps its 0
        ("phone", "+39 (0)6 1234 5678", "+390612345678"),
        ("customer_id", "  CRM-42 ", "CRM-42"),
        ("device_id", "A1B2", "A1B2"),
        ("cookie_id", "\tabc\n", "abc"),
        ("loyalty_card", " 7777 ", "7777"),
        ("EMAIL", "x@y.io", "x@y.io"),
        // Invisible format characters at the ends (a CSV's byte-order mark, a zero-width space).
        ("email", "\u{FEFF}ada@example.com", "ada@example.com"),
        ("device_id", "\u{200B}d1\u{FEFF}", "d1"),
        ("phone", "\u{FEFF}+31 6 1234 5678", "+31612345678"),
    ])
    func normalizes(type: String, raw: String, expected: String) throws {
        let result = try normalizer.normalize(type: type, value: raw).get()
        #expect(result.value == expected)
    }

    @Test("a number dialled with the default region's international prefix is international", arguments: [
        ("US", "011 44 20 7946 0000", "+442079460000"),  // before: refused (+1011…)
        ("CA", "011-31-6-1234-5678", "+31612345678"),
        ("US", "(212) 555-0100", "+12125550100"),
        ("US", "1 212 555 0100", "+12125550100"),
        ("US", "0044 20 7946 0000", "+442079460000"),
        ("AU", "0011 44 20 7946 0000", "+442079460000"),  // before: +11442079460000
        ("AU", "02 9876 5432", "+61298765432"),
        ("JP", "010 44 20 7946 0000", "+442079460000"),
        ("JP", "090 1234 5678", "+819012345678"),
    ])
    func internationalPrefix(region: String, raw: String, expected: String) throws {
        #expect(try Normalizer.e164(raw, region: region).get() == expected)
    }

    @Test("invalid values are refused", arguments: [
        ("email", "not-an-email"), ("email", "a@b"), ("email", "a b@c.io"), ("email", "@c.io"),
        ("phone", "12"), ("phone", "call me"), ("phone", "+0123456789"), ("customer_id", "   "),
        ("email", "ada\u{200B}@example.com"), ("customer_id", "\u{FEFF}"),
    ])
    func invalid(type: String, raw: String) {
        guard case .failure(.invalid) = normalizer.normalize(type: type, value: raw) else {
            Issue.record("\(type) \(raw) was accepted")
            return
        }
    }

    @Test("blocked values are recognised after normalization", arguments: [
        ("email", "TEST@test.com"), ("customer_id", "null"), ("customer_id", "undefined"), ("device_id", "0"),
        ("device_id", "0000"), ("cookie_id", "Anonymous"),
        // Placeholders in an email or phone field: blocked as sent, not refused as malformed.
        ("email", "null"), ("email", " Unknown "), ("phone", "n/a"), ("phone", "0"),
    ])
    func blocked(type: String, raw: String) {
        guard case .failure(.blocked) = normalizer.normalize(type: type, value: raw) else {
            Issue.record("\(type) \(raw) was not blocked")
            return
        }
    }

    @Test("a blocklist pattern matches whichever Unicode form the rule and the value were typed in")
    func blockedPatternForms() {
        var rules = IdentityRules()
        rules.blocked = ["/^jos\u{65}\u{301}@/", "/^ren\u{E9}-/"]  // one rule decomposed, one composed
        let normalizer = Normalizer(rules: rules)
        for (type, raw) in [("email", "jos\u{E9}@example.com"), ("email", "JOSE\u{301}@example.com"),
                            ("customer_id", "rene\u{301}-1"), ("customer_id", "ren\u{E9}-2")] {
            guard case .failure(.blocked) = normalizer.normalize(type: type, value: raw) else {
                Issue.record("\(type) \(raw.unicodeScalars.map { String($0.value, radix: 16) }) was not blocked")
                continue
            }
        }
        guard case .success = normalizer.normalize(type: "email", value: "jose@example.com") else {
            Issue.record("an address the patterns do not match was refused")
            return
        }
    }

    @Test("unknown types and bad rules are named")
    func unknownType() throws {
        guard case .failure(.unknownType("fax")) = normalizer.normalize(type: "fax", value: "1") else {
            Issue.record("fax accepted")
            return
        }
        var rules = IdentityRules()
        rules.limits["fax"] = 1
        #expect(throws: RulesError.self) { try rules.validate() }
        rules = IdentityRules()
        rules.defaultRegion = "XX"
        #expect(throws: RulesError.self) { try rules.validate() }
        rules = IdentityRules()
        rules.blocked = ["/[unclosed/"]
        #expect(throws: RulesError.self) { try rules.validate() }
    }
}

@Suite("identity: linking, merging, unmerging")
struct GraphTests {
    @Test("Link merges; the same Link twice changes nothing; bad input names the field")
    func linkAndIdempotence() async throws {
        let service = try makeService()
        let first = try await service.link([id("email", "a@x.io"), id("cookie_id", "c1")])
        let again = try await service.link([id("email", "A@X.io "), id("cookie_id", "c1")])
        #expect(again.personId == first.personId && again.mergedPersonIds.isEmpty && again.conflicts.isEmpty)
        #expect(try await service.feed().changes.isEmpty)
        #expect(try await service.person(first.personId).identifiers.count == 2)

        await expectInvalid("identifiers[1].value") { _ = try await service.link([id("email", "a@x.io"), id("email", "nope")]) }
        await expectInvalid("identifiers[0].type") { _ = try await service.link([id("fax", "1")]) }
        await expectInvalid("identifiers") { _ = try await service.link([]) }
        await expectInvalid("identifiers") { _ = try await service.link([id("customer_id", "null")]) }
        await expectInvalid("observed_at_ms") { _ = try await service.link([id("email", "a@x.io")], at: -5) }
        await expectInvalid("observed_at_ms") { _ = try await service.link([id("email", "a@x.io")], at: .max) }
    }

    @Test("blocked values never link two people")
    func blockedValues() async throws {
        let service = try makeService()
        let a = try await service.link([id("email", "a@x.io"), id("device_id", "0")])
        let b = try await service.link([id("email", "b@x.io"), id("device_id", "0")])
        #expect(a.personId != b.personId)
        #expect(try await service.person(a.personId).identifiers.map(\.identifier?.type) == ["email"])
        // A placeholder in the email field does not fail the identifiers sent with it.
        let c = try await service.link([id("email", "null"), id("device_id", "d1")])
        #expect(try await service.person(c.personId).identifiers.map(\.identifier?.value) == ["d1"])
        // Resolve: only blocked values name no one; asked to create a person of them, refused.
        var request = IdentityV1.ResolveRequest()
        request.identifiers = [id("email", "null"), id("device_id", "0")]
        #expect(try await service.resolve(request).personId == "")
        request.createIfMissing = true
        await expectInvalid("identifiers") { _ = try await service.resolve(request) }
    }

    @Test("lengths are bounded in bytes: a character with a thousand combining marks is not one character's worth")
    func lengthsInBytes() async throws {
        let service = try makeService()
        let heavy = "a" + String(repeating: "\u{301}", count: 1000)  // one Swift character, 2,001 bytes
        await expectInvalid("source") { _ = try await service.link([id("device_id", "d1")], source: heavy) }
        await expectInvalid("identifiers[0].value") { _ = try await service.link([id("device_id", heavy)]) }
        await expectInvalid("identifiers[0].value") { _ = try await service.link([id("email", heavy + "@x.io")]) }
        _ = try await service.link([id("device_id", String(repeating: "\u{E9}", count: 512))])  // 1,024 bytes: the limit
        await expectInvalid("identifiers[0].value") { _ = try await service.link([id("device_id", String(repeating: "\u{E9}", count: 513))]) }
        // A blocklisted value that is a valid address is blocked in its normalized form (which
        // Erase looks up), not as typed.
        var rules = IdentityRules()
        rules.blocked = ["test@example.com"]
        guard case .failure(.blocked(_, let value)) = Normalizer(rules: rules).normalize(type: "email", value: " Test@Example.COM") else {
            Issue.record("not blocked")
            return
        }
        #expect(value == "test@example.com")
    }

    @Test("merge chain A–B, C–D, then B–C: the oldest person survives, the change feed records it")
    func mergeChain() async throws {
        let service = try makeService()
        let ab = try await service.link([id("cookie_id", "A"), id("cookie_id", "B")], source: "web")
        let cd = try await service.link([id("cookie_id", "C"), id("cookie_id", "D")], source: "app")
        let bc = try await service.link([id("cookie_id", "B"), id("cookie_id", "C")], source: "login")
        #expect(bc.personId == ab.personId)
        #expect(bc.mergedPersonIds == [cd.personId])
        // The merged id still resolves, to the survivor.
        #expect(try await service.person(cd.personId).personId == ab.personId)
        #expect(try await service.person(ab.personId).identifiers.count == 4)
        let feed = try await service.feed()
        #expect(feed.changes.map(\.kind) == [.merge])
        #expect(feed.changes[0].targetPersonId == ab.personId && feed.changes[0].sourcePersonIds == [cd.personId])
        #expect(feed.changes[0].cause == "login")
    }

    @Test("limits are checked before merging; the conflict names the rule and is recorded")
    func limits() async throws {
        let service = try makeService()
        let one = try await service.link([id("customer_id", "C1"), id("email", "one@x.io")])
        let two = try await service.link([id("customer_id", "C2"), id("email", "two@x.io")])
        // A shared device would fuse two customers: refused.
        let device = try await service.link([id("email", "one@x.io"), id("email", "two@x.io"), id("device_id", "ipad")])
        #expect(device.mergedPersonIds.isEmpty)
        #expect(device.conflicts.map(\.rule) == ["max 1 customer_id per person"])
        #expect(Set(device.conflicts[0].personIds) == [one.personId, two.personId])
        #expect(try await service.person(one.personId).identifiers.count == 3)  // the device joined by priority
        #expect(try await service.person(two.personId).identifiers.count == 2)
        var history = IdentityV1.HistoryRequest()
        history.personId = two.personId
        #expect(try await service.history(history).entries.contains { $0.kind == .conflict })
        // The same evidence replayed is not a new conflict (before, one row per replay).
        for _ in 0..<3 { _ = try await service.link([id("email", "one@x.io"), id("email", "two@x.io"), id("device_id", "ipad")]) }
        let all = try await service.history(history)
        #expect(all.entries.count { $0.kind == .conflict } == 1 && !all.truncated)

        // A second customer id for the same person: it becomes its own person.
        let extra = try await service.link([id("email", "one@x.io"), id("customer_id", "C3")])
        #expect(extra.conflicts.first?.rule == "max 1 customer_id per person")
        // History is bounded: the newest entries, oldest first, and a flag when older ones were left out.
        history.personId = one.personId
        let both = try await service.history(history)
        #expect(both.entries.count == 2 && !both.truncated, "\(both)")
        history.limit = 1
        let newest = try await service.history(history)
        #expect(newest.entries == [both.entries[1]] && newest.truncated)
        history.limit = 10_001
        await expectInvalid("limit") { _ = try await service.history(history) }
        // And bounded in bytes: the newest that fit (before, a long history answered
        // RESOURCE_EXHAUSTED, with no way to page past it).
        var small = service
        small.changesPageBytes = 1  // the newest entry always fits
        history.limit = 0
        let fitted = try await small.history(history)
        #expect(fitted.entries == [both.entries[1]] && fitted.truncated)
        #expect(try await service.person(one.personId).identifiers.filter { $0.identifier?.type == "customer_id" }.count == 1)
    }

    @Test("unmerge by merge and by identifiers; the operator's split holds on re-link")
    func unmergeThenRelink() async throws {
        let service = try makeService()
        let a = try await service.link([id("email", "a@x.io"), id("cookie_id", "k1")])
        let b = try await service.link([id("email", "b@x.io"), id("cookie_id", "k2")])
        let bad = try await service.link([id("cookie_id", "k1"), id("cookie_id", "k2")], source: "shared laptop")
        #expect(bad.mergedPersonIds == [b.personId])
        let mergeSeq = try await service.feed().changes[0].seq

        var unmerge = IdentityV1.UnmergeRequest()
        unmerge.personId = a.personId
        unmerge.mergeId = 1
        unmerge.reason = "shared laptop, two people"
        let undone = try await service.unmerge(unmerge)
        #expect(undone.newPersonId == b.personId)  // the former person comes back under its own id
        #expect(Set(try await service.person(b.personId).identifiers.compactMap(\.identifier?.value)) == ["b@x.io", "k2"])
        #expect(Set(try await service.person(a.personId).identifiers.compactMap(\.identifier?.value)) == ["a@x.io", "k1"])
        let feed = try await service.feed(after: mergeSeq)
        #expect(feed.changes.map(\.kind) == [.unmerge])
        // Well formed, but the state does not allow it: FAILED_PRECONDITION (before, INVALID_ARGUMENT).
        await expectCode(.failedPrecondition) { _ = try await service.unmerge(unmerge) }  // undone already
        var everything = IdentityV1.UnmergeRequest()
        everything.personId = b.personId
        everything.identifiers = [id("email", "b@x.io"), id("cookie_id", "k2")]
        await expectCode(.failedPrecondition) { _ = try await service.unmerge(everything) }

        // The same evidence again does not silently undo the operator's decision.
        let relink = try await service.link([id("cookie_id", "k1"), id("cookie_id", "k2")], source: "shared laptop")
        #expect(relink.mergedPersonIds.isEmpty)
        #expect(relink.conflicts.first?.rule.hasPrefix("unmerged by an operator") == true)

        // Detach identifiers into a new person.
        unmerge = IdentityV1.UnmergeRequest()
        unmerge.personId = a.personId
        unmerge.identifiers = [id("cookie_id", "k1")]
        let detached = try await service.unmerge(unmerge)
        #expect(try await service.person(detached.newPersonId).identifiers.compactMap(\.identifier?.value) == ["k1"])
        await expectInvalid("identifiers") {
            var both = IdentityV1.UnmergeRequest()
            both.personId = a.personId
            _ = try await service.unmerge(both)
        }
    }

    @Test("undoing an inner merge gives back the persons it had absorbed; the split holds for whoever absorbs them; the feed names each merge")
    func unmergeInnerMerge() async throws {
        let service = try makeService()
        let z = try await service.link([id("cookie_id", "z")])  // the oldest: it survives every merge
        let a = try await service.link([id("cookie_id", "a")])
        let b = try await service.link([id("cookie_id", "b")])
        let c = try await service.link([id("cookie_id", "c")])
        _ = try await service.link([id("cookie_id", "b"), id("cookie_id", "c")])  // c into b
        _ = try await service.link([id("cookie_id", "a"), id("cookie_id", "b")])  // b (with c) into a
        let merges = try await service.feed().changes
        #expect(merges.map { [$0.targetPersonId, $0.sourcePersonIds.first ?? ""] } == [[b.personId, c.personId], [a.personId, b.personId]])
        #expect(merges.map(\.mergeId) == [1, 2])

        // Undo b's merge into a, by the id the feed gave: c comes back with b, as its identifier does.
        // Named by b's own id, merged away: the answer names a, the person it was split from
        // (before, b twice).
        var unmerge = IdentityV1.UnmergeRequest()
        unmerge.personId = b.personId
        unmerge.mergeId = merges[1].mergeId
        let undone = try await service.unmerge(unmerge)
        #expect(undone.newPersonId == b.personId && undone.personId == a.personId)
        #expect(Set(try await service.person(b.personId).identifiers.compactMap(\.identifier?.value)) == ["b", "c"])
        // Before, c still pointed at a, which holds none of its identifiers.
        #expect(try await service.person(c.personId).personId == b.personId)

        // a goes into z; the operator's split of a and b still holds for z.
        _ = try await service.link([id("cookie_id", "z"), id("cookie_id", "a")])
        #expect(try await service.person(a.personId).personId == z.personId)
        let relink = try await service.link([id("cookie_id", "a"), id("cookie_id", "b")], source: "shared laptop")
        #expect(relink.mergedPersonIds.isEmpty, "before, z absorbed b: the split named a, not z")
        #expect(relink.conflicts.first?.rule == "unmerged by an operator: \(min(a.personId, b.personId)) and \(max(a.personId, b.personId)) stay apart")
    }

    @Test("a split holds between the persons separated in fact, also once the person they were merged into is a person again")
    func splitHoldsAfterOuterUnmerge() async throws {
        let service = try makeService()
        let z = try await service.link([id("cookie_id", "z")])  // the oldest: it survives every merge
        let a = try await service.link([id("cookie_id", "a")])
        let b = try await service.link([id("cookie_id", "b")])
        _ = try await service.link([id("cookie_id", "a"), id("cookie_id", "b")])  // merge 1: b into a
        _ = try await service.link([id("cookie_id", "z"), id("cookie_id", "a")])  // merge 2: a (with b) into z
        for merge: Int64 in [1, 2] {
            var unmerge = IdentityV1.UnmergeRequest()
            unmerge.personId = z.personId
            unmerge.mergeId = merge
            _ = try await service.unmerge(unmerge)
        }
        // a and b are persons again; the operator separated b from a (before, the split named
        // z and b only, and this merged them again).
        let relink = try await service.link([id("cookie_id", "a"), id("cookie_id", "b")])
        #expect(relink.mergedPersonIds.isEmpty)
        #expect(relink.conflicts.first?.rule.hasPrefix("unmerged by an operator") == true)
        #expect(try await service.person(b.personId).personId == b.personId)
        #expect(try await service.person(a.personId).personId == a.personId)

        // Detached identifiers are kept apart from the person they came from, too.
        _ = try await service.link([id("cookie_id", "c"), id("device_id", "d1")])
        _ = try await service.link([id("cookie_id", "z"), id("cookie_id", "c")])  // merge 3: c into z
        var detach = IdentityV1.UnmergeRequest()
        detach.personId = z.personId
        detach.identifiers = [id("device_id", "d1")]
        let detached = try await service.unmerge(detach)
        var back = IdentityV1.UnmergeRequest()
        back.personId = z.personId
        back.mergeId = 3
        _ = try await service.unmerge(back)  // c is a person again
        let again = try await service.link([id("cookie_id", "c"), id("device_id", "d1")])
        #expect(again.mergedPersonIds.isEmpty, "the detached d1 merged back into c")
        #expect(try await service.person(detached.newPersonId).personId == detached.newPersonId)
    }

    @Test("racing links on overlapping identifiers end in one consistent graph")
    func racingLinks() async throws {
        let directory = tempDirectory()
        let service = try makeService(directory)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for i in 0..<40 {
                group.addTask {
                    _ = try await service.link([id("cookie_id", "c\(i)"), id("cookie_id", "c\((i + 1) % 40)"), id("device_id", "d\(i % 7)")])
                }
            }
            try await group.waitForAll()
        }
        let pool = try DatabasePool(path: directory + "/identity.sqlite")
        let persons = try await pool.read { db in
            try String.fetchAll(db, sql: "SELECT DISTINCT person_id FROM identifier")
        }
        #expect(persons.count == 1)
        let count = try await pool.read { db in try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM identifier")! }
        #expect(count == 47)
    }
}

@Suite("identity: change feed, erasure, privacy")
struct FeedAndErasureTests {
    @Test("the change feed is consecutive while the service runs, resumes after a restart, and its numbers jump past any it gave before")
    func feedResumes() async throws {
        let directory = tempDirectory()
        var next: UInt64 = 0
        let startMs = Int64(Date().timeIntervalSince1970 * 1000)
        do {
            let service = try makeService(directory)
            for i in 0..<5 {
                _ = try await service.link([id("cookie_id", "x\(i)")])
                _ = try await service.link([id("cookie_id", "y\(i)")])
                _ = try await service.link([id("cookie_id", "x\(i)"), id("cookie_id", "y\(i)")])
            }
            var request = IdentityV1.ListChangesRequest()
            request.limit = 2
            let page = try await service.listChanges(request)
            // The first change takes the floor set at open (the start time in µs), the next follow.
            #expect(page.changes.count == 2 && page.changes[0].seq >= UInt64(startMs) * 1000 && page.changes[1].seq == page.changes[0].seq + 1)
            next = page.nextAfterSeq
        }
        let reopened = try makeService(directory)
        let rest = try await reopened.feed(after: next)
        #expect(rest.changes.map(\.seq) == Array(next + 1...next + UInt64(rest.changes.count)))
        #expect(rest.nextAfterSeq == rest.changes.last!.seq)
        #expect(try await reopened.feed(after: rest.nextAfterSeq).changes.isEmpty)
    }

    @Test("after a backup is restored, a new change never takes the number of one a follower already saw")
    func feedAfterRestore() async throws {
        let directory = tempDirectory(), backup = tempDirectory()
        func merge(_ service: IdentityService, _ tag: String) async throws {
            _ = try await service.link([id("cookie_id", "a-\(tag)")])
            _ = try await service.link([id("cookie_id", "b-\(tag)")])
            _ = try await service.link([id("cookie_id", "a-\(tag)"), id("cookie_id", "b-\(tag)")])
        }
        do { try await merge(try makeService(directory), "1") }
        // The backup, as SQLite makes one of a live database.
        try openStoreFile(directory).inDatabase { db in
            try db.execute(sql: "VACUUM INTO ?", arguments: [backup + "/identity.sqlite"])
        }
        var seen: UInt64 = 0
        do {
            let service = try makeService(directory)
            try await merge(service, "2")
            try await merge(service, "3")
            seen = try await service.feed().nextAfterSeq  // a follower applied every change
        }
        // Restored: the last two merges are gone. The next change goes past what the follower saw.
        let restoredDirectory = tempDirectory()
        try FileManager.default.copyItem(atPath: backup + "/identity.sqlite", toPath: restoredDirectory + "/identity.sqlite")
        let restored = try makeService(restoredDirectory)
        #expect(try await restored.feed().changes.count == 1)
        try await merge(restored, "4")
        let news = try await restored.feed(after: seen).changes
        #expect(news.count == 1 && news[0].kind == .merge, "the follower would skip the new merge: \(news)")
    }

    @Test("a ListChanges page stops at its byte bound, never empty, and the pages hold every change once")
    func feedPagesByBytes() async throws {
        var service = try makeService(tempDirectory())
        for i in 0..<6 {  // a merge each
            _ = try await service.link([id("cookie_id", "a\(i)")])
            _ = try await service.link([id("cookie_id", "b\(i)")])
            _ = try await service.link([id("cookie_id", "a\(i)"), id("cookie_id", "b\(i)")])
        }
        let all = try await service.feed().changes.map(\.seq)
        #expect(all.count >= 6)
        service.changesPageBytes = 1  // one change a page: the first always fits
        var seen: [UInt64] = [], after: UInt64 = 0
        while seen.count <= all.count {
            let page = try await service.feed(after: after)
            guard !page.changes.isEmpty else { break }
            #expect(page.changes.count == 1 && page.nextAfterSeq == page.changes[0].seq)
            seen += page.changes.map(\.seq)
            after = page.nextAfterSeq
        }
        #expect(seen == all)
    }

    @Test("GetPerson pages a person's identifiers in (type, value) order; bad paging names the field")
    func getPersonPages() async throws {
        let service = try makeService()
        let person = try await service.link([id("email", "pager@example.org")])
        for i in 0..<4 { _ = try await service.link([id("email", "pager@example.org"), id("cookie_id", "ck\(i)")]) }
        var request = IdentityV1.GetPersonRequest()
        request.personId = person.personId
        request.pageSize = 2
        var pages: [[String]] = []
        repeat {
            let page = try await service.getPerson(request)
            #expect(page.personId == person.personId)
            pages.append(page.identifiers.map { "\($0.identifier!.type):\($0.identifier!.value)" })
            request.pageToken = page.nextPageToken
        } while !request.pageToken.isEmpty && pages.count < 10
        #expect(pages == [["cookie_id:ck0", "cookie_id:ck1"], ["cookie_id:ck2", "cookie_id:ck3"], ["email:pager@example.org"]])
        // By default one page holds them all, with no token.
        request.pageSize = 0
        let whole = try await service.getPerson(request)
        #expect(whole.identifiers.count == 5 && whole.nextPageToken.isEmpty)
        request.pageSize = 10_001
        await #expect(throws: RPCError.invalidArgument(field: "page_size", "must be at most 10000, got 10001")) { _ = try await service.getPerson(request) }
        request.pageSize = 2
        request.pageToken = "not a token"
        await #expect(throws: RPCError.invalidArgument(field: "page_token", "is not a token this service gave")) { _ = try await service.getPerson(request) }
    }

    @Test("after Erase no identifier of that person is in the SQLite files")
    func eraseLeavesNothing() async throws {
        let directory = tempDirectory()
        let service = try makeService(directory)
        let marker = "zebra.unique.\(UInt32.random(in: 0...UInt32.max))"
        let a = try await service.link([id("email", "\(marker)@example.org"), id("phone", "+31 6 9876 5432"), id("cookie_id", "\(marker)-cookie")])
        let b = try await service.link([id("cookie_id", "other-\(marker)")])
        _ = try await service.link([id("cookie_id", "\(marker)-cookie"), id("cookie_id", "other-\(marker)")])
        let keep = try await service.link([id("email", "keep@example.org")])

        var erase = IdentityV1.EraseRequest()
        erase.target = .personId(b.personId)  // erasing via the merged id erases the survivor and all it absorbed
        let erased = try await service.erase(erase)
        #expect(erased.identifiersRemoved == 4)

        for file in ["identity.sqlite", "identity.sqlite-wal"] {
            guard let data = FileManager.default.contents(atPath: directory + "/" + file) else { continue }
            let bytes = [UInt8](data)
            for needle in [marker, "31698765432"] {
                #expect(!bytes.contains(subsequence: Array(needle.utf8)), "\(needle) still in \(file)")
            }
        }
        await #expect(throws: RPCError.self) { _ = try await service.person(a.personId) }
        #expect(try await service.person(keep.personId).identifiers.count == 1)
        let last = try await service.feed().changes.last!
        #expect(last.kind == .erase && last.seq == erased.changeSeq)
        // Again, by either id (a retry after a failed WAL truncation): the same erasure, nothing
        // more removed, no new change. Before, NOT_FOUND, and the truncation was never redone.
        for person in [a.personId, b.personId] {
            erase.target = .personId(person)
            let again = try await service.erase(erase)
            #expect(again.changeSeq == erased.changeSeq && again.identifiersRemoved == 0)
        }
        #expect(try await service.feed().changes.last!.seq == erased.changeSeq)
    }

    @Test("erasing a person who absorbed many names them over several changes of bounded size, so that a feed page always holds one")
    func largeErasureInChunks() async throws {
        let service = try makeService(erasureChunk: 2)
        let survivor = try await service.link([id("cookie_id", "hub")])
        var absorbed: [String] = []
        for i in 0..<5 {
            absorbed.append(try await service.link([id("cookie_id", "leaf\(i)")]).personId)
            _ = try await service.link([id("cookie_id", "hub"), id("cookie_id", "leaf\(i)")])
        }
        var erase = IdentityV1.EraseRequest()
        erase.target = .personId(survivor.personId)
        let erased = try await service.erase(erase)
        let changes = try await service.feed().changes.filter { $0.kind == .erase }
        // Three changes of at most two absorbed persons each (before, one naming all five).
        #expect(changes.map(\.sourcePersonIds.count) == [2, 2, 1])
        #expect(changes.allSatisfy { $0.targetPersonId == survivor.personId })
        #expect(Set(changes.flatMap(\.sourcePersonIds)) == Set(absorbed))
        #expect(erased.changeSeq == changes.last!.seq)
        // A retry, by the survivor's id or by any absorbed person's, answers the last of them and adds none.
        #expect(try await service.erase(erase).changeSeq == erased.changeSeq)
        for person in absorbed {
            erase.target = .personId(person)
            #expect(try await service.erase(erase).changeSeq == erased.changeSeq)
        }
        #expect(try await service.feed().changes.filter { $0.kind == .erase }.count == 3)
    }

    @Test("an identifier's erasure whose WAL truncation failed is completed by a retry, which answers NOT_FOUND")
    func eraseIdentifierRetryTimed() async throws {
        let directory = tempDirectory()
        let service = try makeService(directory)
        let marker = "okapi.unique.\(UInt32.random(in: 0...UInt32.max))"
        _ = try await service.link([id("email", "\(marker)@example.org"), id("cookie_id", "keep-\(marker.count)")])
        func stillInFiles() -> Bool { filesContain(marker, in: directory, files: ["identity.sqlite", "identity.sqlite-wal"]) }
        var erase = IdentityV1.EraseRequest()
        var identifier = CommonV1.Identifier()
        (identifier.type, identifier.value) = ("email", "\(marker)@example.org")
        erase.target = .identifier(identifier)
        // A reader on an older snapshot: the truncation after the erasure cannot finish (5 s).
        let release = try await holdReadSnapshot(directory + "/identity.sqlite")
        await #expect(throws: (any Error).self) { _ = try await service.erase(erase) }
        release()
        #expect(stillInFiles(), "the failed truncation left old pages")
        // The retry: nothing to erase (NOT_FOUND), and the truncation done.
        await expectCode(.notFound) { _ = try await service.erase(erase) }
        #expect(!stillInFiles())

        // Without a retry and with no other call: the service's retrier pays it (before, the
        // next write did, so on a quiet system the old pages waited).
        let other = "zebra.unique.\(UInt32.random(in: 0...UInt32.max))"
        _ = try await service.link([id("email", "\(other)@example.org"), id("cookie_id", "keep-\(marker.count)")])
        (identifier.type, identifier.value) = ("email", "\(other)@example.org")
        erase.target = .identifier(identifier)
        let held = try await holdReadSnapshot(directory + "/identity.sqlite")
        await #expect(throws: (any Error).self) { _ = try await service.erase(erase) }
        let retrier = Task { try await service.store.truncationRetrier(interval: .milliseconds(20), logger: Logger(label: "test")).run() }
        defer { retrier.cancel() }
        try await Task.sleep(for: .milliseconds(200))
        #expect(filesContain(other, in: directory, files: ["identity.sqlite", "identity.sqlite-wal"]), "paid while the reader held its snapshot")
        held()
        #expect(try await eventually { !filesContain(other, in: directory, files: ["identity.sqlite", "identity.sqlite-wal"]) })
    }

    @Test("privacy mode stores keyed hashes only, and lookups still work")
    func privacyMode() async throws {
        let directory = tempDirectory()
        let service = try makeService(directory, key: Array("0123456789abcdef0123456789abcdef".utf8))
        let linked = try await service.link([id("email", "Secret.Person@Example.org"), id("phone", "+44 20 7946 0000")])
        var resolve = IdentityV1.ResolveRequest()
        resolve.identifiers = [id("email", "secret.person@example.org")]
        #expect(try await service.resolve(resolve).personId == linked.personId)
        let stored = try await service.person(linked.personId).identifiers.compactMap(\.identifier?.value)
        #expect(stored.allSatisfy { $0.hasPrefix("h:") && $0.count == 66 })
        for file in ["identity.sqlite", "identity.sqlite-wal"] {
            guard let data = FileManager.default.contents(atPath: directory + "/" + file) else { continue }
            #expect(![UInt8](data).contains(subsequence: Array("secret.person".utf8)))
            #expect(![UInt8](data).contains(subsequence: Array("442079460000".utf8)))
        }
    }

    @Test("a store opens only with the privacy key it was written with (or without one, if it was), also a store from before the check")
    func privacyKeyTiedToStore() async throws {
        let keyA = Array("0123456789abcdef0123456789abcdef".utf8), keyB = Array("fedcba9876543210fedcba9876543210".utf8)
        func found(_ service: IdentityService, _ person: String) async throws -> Bool {
            var resolve = IdentityV1.ResolveRequest()
            resolve.identifiers = [id("email", "ann@example.org")]
            return try await service.resolve(resolve).personId == person
        }
        let hashed = tempDirectory()
        let person = try await makeService(hashed, key: keyA).link([id("email", "ann@example.org")]).personId
        #expect(throws: IdentityStore.PrivacyKeyMismatch.self) { _ = try makeService(hashed, key: keyB) }
        #expect(throws: IdentityStore.PrivacyKeyMismatch.self) { _ = try makeService(hashed) }
        #expect(try await found(try makeService(hashed, key: keyA), person))

        let plain = tempDirectory()
        let plainPerson = try await makeService(plain).link([id("email", "ann@example.org")]).personId
        do {
            _ = try makeService(plain, key: keyA)
            Issue.record("opened a store written in the clear with a key")
        } catch let error as IdentityStore.PrivacyKeyMismatch {
            #expect(error.description.hasPrefix("the store holds identifiers in the clear"))
        }
        // A store from before the check remembers nothing: its identifiers tell.
        for directory in [hashed, plain] {
            try await openStoreFile(directory).write { try $0.execute(sql: "DELETE FROM store_setting") }
        }
        #expect(throws: IdentityStore.PrivacyKeyMismatch.self) { _ = try makeService(plain, key: keyA) }
        #expect(throws: IdentityStore.PrivacyKeyMismatch.self) { _ = try makeService(hashed) }
        #expect(try await found(try makeService(plain), plainPerson))
        _ = try makeService(hashed, key: keyA)  // which key made the hashes cannot be told: this one is remembered
        #expect(throws: IdentityStore.PrivacyKeyMismatch.self) { _ = try makeService(hashed, key: keyB) }
    }

    @Test("Resolve without create_if_missing never writes")
    func resolveReadOnly() async throws {
        let service = try makeService()
        var request = IdentityV1.ResolveRequest()
        request.identifiers = [id("email", "new@x.io")]
        #expect(try await service.resolve(request).personId == "")
        request.createIfMissing = true
        let created = try await service.resolve(request)
        #expect(created.created && !created.personId.isEmpty)
        request.createIfMissing = false
        let found = try await service.resolve(request)
        #expect(found.personId == created.personId && found.matched.map(\.value) == ["new@x.io"])
    }

    @Test("History lists entries in the order they were recorded, not by the times clients gave; a limit keeps the newest recorded")
    func historyInRecordingOrder() async throws {
        let service = try makeService()
        let dayBefore: Int64 = 1_700_000_000_000 - 86_400_000
        let a = try await service.link([id("cookie_id", "h-a"), id("customer_id", "crm-1")])
        _ = try await service.link([id("cookie_id", "h-b")])
        _ = try await service.link([id("cookie_id", "h-c")])
        // b joins a; then a second customer id for a, observed a day earlier (a conflict); then
        // c joins a, observed a day earlier too.
        _ = try await service.link([id("cookie_id", "h-a"), id("cookie_id", "h-b")])
        _ = try await service.link([id("cookie_id", "h-a"), id("customer_id", "crm-2")], at: dayBefore)
        _ = try await service.link([id("cookie_id", "h-a"), id("cookie_id", "h-c")], at: dayBefore)
        var request = IdentityV1.HistoryRequest()
        request.personId = a.personId
        let entries = try await service.history(request).entries
        // Before, by time: the conflict and c's merge came first.
        #expect(entries.map(\.kind) == [.merge, .conflict, .merge], "\(entries.map(\.kind))")
        #expect(entries[0].seq < entries[2].seq && entries[2].atMs == dayBefore)
        // A limit of one keeps the last recorded (before: b's merge, the latest by time).
        request.limit = 1
        #expect(try await service.history(request).entries.map(\.seq) == [entries[2].seq])
    }

    @Test("a conflict recorded before History's recording order was kept goes between its persons' changes by its time")
    func historyOrderMigration() async throws {
        let directory = try await storeBefore("v7: the privacy key the store is written with", """
            INSERT INTO person (seq, id, created_at_ms, state, merged_into) VALUES
              (1, 'pa', 1, 'active', NULL), (2, 'pb', 2, 'merged', 'pa'), (3, 'pc', 3, 'merged', 'pa'), (4, 'pd', 4, 'active', NULL);
            INSERT INTO change (seq, kind, target, sources, cause, at_ms, merge_id) VALUES
              (1, 1, 'pa', 'pb', 'login', 10, 1), (2, 1, 'pa', 'pc', 'login', 30, 2);
            INSERT INTO change_person (person_id, seq) VALUES ('pa', 1), ('pb', 1), ('pa', 2), ('pc', 2);
            INSERT INTO conflict (id, person_ids, rule, identifier_type, cause, at_ms) VALUES
              (1, 'pd,pa', 'max 1 customer_id per person', 'customer_id', 'crm', 20);
            INSERT INTO conflict_person (person_id, conflict_id) VALUES ('pd', 1), ('pa', 1);
            """)
        let service = try makeService(directory)
        var request = IdentityV1.HistoryRequest()
        request.personId = "pa"
        #expect(try await service.history(request).entries.map(\.kind) == [.merge, .conflict, .merge])
    }

    @Test("History finds a person's entries by person; a store from before that index gets it filled")
    func historyIndexMigration() async throws {
        // The v2 layout, with a merge of b into a, an unrelated erasure, and a conflict of a and c.
        let directory = try await storeBefore("v2: merge ids in the feed, absorbed persons indexed", """
            INSERT INTO person (seq, id, created_at_ms, state, merged_into) VALUES
              (1, 'pa', 1, 'active', NULL), (2, 'pb', 2, 'merged', 'pa'), (3, 'pc', 3, 'active', NULL), (4, 'pd', 4, 'erased', NULL);
            INSERT INTO merge (id, target, source, cause, at_ms) VALUES (1, 'pa', 'pb', 'login', 10);
            INSERT INTO change (seq, kind, target, sources, cause, at_ms, merge_id) VALUES
              (1, 1, 'pa', 'pb', 'login', 10, 1), (2, 3, 'pd', '', 'erased', 11, 0);
            INSERT INTO conflict (id, person_ids, rule, identifier_type, cause, at_ms) VALUES
              (1, 'pc,pa', 'max 1 customer_id per person', 'customer_id', 'crm', 12);
            """)
        let service = try makeService(directory)
        var request = IdentityV1.HistoryRequest()
        request.personId = "pb"  // a merged-away id: the survivor's history
        let entries = try await service.history(request).entries
        #expect(entries.map(\.kind) == [.merge, .conflict] && entries[0].mergeId == 1, "\(entries)")
        request.personId = "pc"
        #expect(try await service.history(request).entries.map(\.kind) == [.conflict])
        // New entries are indexed as they are written: a merge, found from its absorbed person.
        _ = try await service.link([id("cookie_id", "k1")])
        let second = try await service.link([id("cookie_id", "k2")])
        _ = try await service.link([id("cookie_id", "k1"), id("cookie_id", "k2")])
        request.personId = second.personId
        #expect(try await service.history(request).entries.map(\.kind) == [.merge])
    }

    @Test("an email is stored composed (NFC): typed with a combining accent it finds the same person; one stored before in another form is rewritten, a duplicate dropped")
    func emailsComposed() async throws {
        let composed = "jos\u{E9}@example.com", decomposed = "JOSE\u{301}@example.com"
        let normalizer = Normalizer(rules: IdentityRules())
        guard case .success(let normalized) = normalizer.normalize(type: "email", value: decomposed) else {
            Issue.record("refused")
            return
        }
        #expect(normalized.value.utf8.elementsEqual(composed.utf8))

        // A v9 store holding one decomposed address (pa), and one held in both forms (pb's
        // decomposed, pc's composed).
        let directory = try await storeBefore("v9: conflicts from before v8 placed", """
            INSERT INTO person (seq, id, created_at_ms, state, merged_into) VALUES
              (1, 'pa', 1, 'active', NULL), (2, 'pb', 2, 'active', NULL), (3, 'pc', 3, 'active', NULL);
            INSERT INTO identifier (type, value, person_id, first_seen_ms, last_seen_ms, source) VALUES
              ('email', 'jose\u{301}@example.com', 'pa', 1, 1, 'crm'),
              ('email', 'zoe\u{308}@example.com', 'pb', 1, 1, 'crm'), ('email', 'zo\u{EB}@example.com', 'pc', 1, 1, 'crm');
            """)
        let service = try makeService(directory)
        var request = IdentityV1.ResolveRequest()
        for (typed, person) in [(composed, "pa"), (decomposed, "pa"), ("zo\u{EB}@example.com", "pc"), ("zoe\u{308}@example.com", "pc")] {
            request.identifiers = [id("email", typed)]
            #expect(try await service.resolve(request).personId == person, "\(typed)")
        }
        let stored = try await openStoreFile(directory).read { db in try String.fetchAll(db, sql: "SELECT value FROM identifier ORDER BY value") }
        #expect(stored.map { Array($0.utf8) } == ["jos\u{E9}@example.com", "zo\u{EB}@example.com"].map { Array($0.utf8) })
    }

    @Test("emails in NFC: a merge record naming a decomposed copy dropped as a duplicate is dropped too (an unmerge moves no other row); a privacy store that hashed emails as typed keeps finding them")
    func emailsComposedEdges() async throws {
        let composed = "zo\u{EB}@example.com", decomposed = "zoe\u{308}@example.com"
        // pb, holding the decomposed copy, was merged into pa, which holds the composed one.
        let merged = try await storeBefore("v9: conflicts from before v8 placed", """
            INSERT INTO person (seq, id, created_at_ms, state, merged_into) VALUES (1, 'pa', 1, 'active', NULL), (2, 'pb', 2, 'merged', 'pa');
            INSERT INTO identifier (type, value, person_id, first_seen_ms, last_seen_ms, source) VALUES
              ('email', '\(composed)', 'pa', 1, 1, 'crm'), ('email', '\(decomposed)', 'pa', 1, 1, 'crm');
            INSERT INTO merge (id, target, source, cause, at_ms) VALUES (1, 'pa', 'pb', 'login', 10);
            INSERT INTO merge_member (merge_id, type, value) VALUES (1, 'email', '\(decomposed)');
            """)
        let service = try makeService(merged)
        var unmerge = IdentityV1.UnmergeRequest()
        unmerge.personId = "pa"
        unmerge.mergeId = 1
        _ = try await service.unmerge(unmerge)
        // Before, the merge record was renamed to the composed address, and the unmerge moved pa's own.
        #expect(try await service.person("pa").identifiers.compactMap(\.identifier?.value).map { Array($0.utf8) } == [Array(composed.utf8)])

        // A privacy store from before v10 holding the keyed hash of an address typed decomposed.
        let key = [UInt8](repeating: 7, count: 32)
        var asTyped = Normalizer(rules: IdentityRules(), privacyKey: key)
        asTyped.composesEmails = false
        guard case .success(let typed) = asTyped.normalize(type: "email", value: decomposed) else {
            Issue.record("refused")
            return
        }
        let hashed = try await storeBefore("v9: conflicts from before v8 placed", """
            INSERT INTO person (seq, id, created_at_ms, state, merged_into) VALUES (1, 'pa', 1, 'active', NULL);
            INSERT INTO identifier (type, value, person_id, first_seen_ms, last_seen_ms, source) VALUES ('email', '\(asTyped.storedValue(typed))', 'pa', 1, 1, 'crm');
            INSERT INTO store_setting (name, value) VALUES ('privacy_key', '\(asTyped.keyFingerprint)');
            """)
        let privateService = try makeService(hashed, key: key)
        var request = IdentityV1.ResolveRequest()
        request.identifiers = [id("email", decomposed)]
        // The same input finds its person (composed, it would hash otherwise and miss).
        #expect(try await privateService.resolve(request).personId == "pa")
    }

    @Test("numbers stored with a trunk 0 after the country code are rewritten, so the same input finds the same person")
    func phoneMigration() async throws {
        let directory = try await storeBefore("v3: changes and conflicts by person", """
            INSERT INTO person (seq, id, created_at_ms, state, merged_into) VALUES (1, 'pa', 1, 'active', NULL), (2, 'pi', 2, 'active', NULL),
              (3, 'pb', 3, 'active', NULL), (4, 'pc', 4, 'active', NULL);
            INSERT INTO identifier (type, value, person_id, first_seen_ms, last_seen_ms, source) VALUES
              ('phone', '+4402079460000', 'pa', 1, 1, 'crm'), ('phone', '+390612345678', 'pi', 1, 1, 'crm'),
              ('phone', '+442079460001', 'pb', 1, 1, 'crm'), ('phone', '+4402079460001', 'pc', 1, 1, 'crm');
            """)
        let service = try makeService(directory)
        var request = IdentityV1.ResolveRequest()
        request.identifiers = [id("phone", "+44 (0)20 7946 0000")]
        #expect(try await service.resolve(request).personId == "pa")  // before, no one: it was stored as +4402…
        request.identifiers = [id("phone", "+39 06 1234 5678")]
        #expect(try await service.resolve(request).personId == "pi")  // Italy's 0 is part of the number
        // Stored both ways: the old form, which no input finds and no erasure reached, is gone.
        request.identifiers = [id("phone", "+44 (0)20 7946 0001")]
        #expect(try await service.resolve(request).personId == "pb")
        let copies = try await service.store.pool.read { try Int.fetchOne($0, sql: "SELECT count(*) FROM identifier WHERE value LIKE '%2079460001'") }
        #expect(copies == 1)
    }

    @Test("numbers stored before the region's own international prefix was known are rewritten once, so the same input finds the same person",
          arguments: [("US", "+1011442079460000", "011 44 20 7946 0000"), ("us", "+1011442079460000", "011 44 20 7946 0000"),
                      ("AU", "+11442079460000", "0011 44 20 7946 0000"),
                      ("JP", "+8110442079460000", "010 44 (0)20 7946 0000")])
    func exitPrefixRewritten(region: String, stored: String, input: String) async throws {
        let directory = try await storeBefore("v8: where a conflict falls in the feed", """
            INSERT INTO person (seq, id, created_at_ms, state, merged_into) VALUES (1, 'pa', 1, 'active', NULL), (2, 'pb', 2, 'active', NULL),
              (3, 'pc', 3, 'active', NULL);
            INSERT INTO identifier (type, value, person_id, first_seen_ms, last_seen_ms, source) VALUES
              ('phone', '\(stored)', 'pa', 1, 1, 'crm'), ('phone', '\(stored.dropLast())1', 'pb', 1, 1, 'crm'),
              ('phone', '+44207946000' || '1', 'pc', 1, 1, 'crm');
            """)
        var rules = IdentityRules()
        rules.defaultRegion = region
        let service = try makeService(directory, rules: rules)
        var request = IdentityV1.ResolveRequest()
        request.identifiers = [id("phone", input)]
        #expect(try await service.resolve(request).personId == "pa")  // before, no one: the same input reads differently now
        // Stored both ways: the old form, which no input finds any more, goes.
        let rows = try await service.store.pool.read { try String.fetchAll($0, sql: "SELECT person_id FROM identifier WHERE value LIKE '%2079460001'") }
        #expect(rows == ["pc"])
        // Once: a number stored in the old form later (by hand) is left alone at the next start.
        try await service.store.pool.write { try $0.execute(sql: "UPDATE identifier SET value = ? WHERE person_id = 'pc'", arguments: [stored]) }
        let again = try makeService(directory, rules: rules)
        #expect(try await again.store.pool.read { try String.fetchOne($0, sql: "SELECT value FROM identifier WHERE person_id = 'pc'") } == stored)
    }

    @Test("values stored with invisible format characters at their ends are trimmed by migration, so lookups and Erase find them")
    func formatCharactersMigrated() async throws {
        let directory = try await storeBefore("v10: emails in Unicode's composed form (NFC)", """
            INSERT INTO person (seq, id, created_at_ms, state, merged_into) VALUES (1, 'pa', 1, 'active', NULL), (2, 'pb', 2, 'active', NULL);
            INSERT INTO identifier (type, value, person_id, first_seen_ms, last_seen_ms, source) VALUES
              ('email', char(65279) || 'ada@example.com', 'pa', 1, 1, 'csv'), ('device_id', 'd1' || char(8203), 'pb', 1, 1, 'app'),
              ('device_id', 'd2', 'pb', 1, 1, 'app');
            """)
        let service = try makeService(directory)
        var request = IdentityV1.ResolveRequest()
        request.identifiers = [id("email", "ada@example.com")]
        #expect(try await service.resolve(request).personId == "pa")  // before, no one: the stored copy kept its mark
        request.identifiers = [id("device_id", "d1")]
        #expect(try await service.resolve(request).personId == "pb")
        var erase = IdentityV1.EraseRequest()
        var identifier = CommonV1.Identifier()
        (identifier.type, identifier.value) = ("device_id", "d1")
        erase.target = .identifier(identifier)
        _ = try await service.erase(erase)
        #expect(try await service.person("pb").identifiers.compactMap(\.identifier?.value) == ["d2"])
    }

    @Test("two Resolves racing to create one person: one says it created it, the other that it matched")
    func resolveCreateRace() async throws {
        let service = try makeService()
        for round in 0..<20 {
            let request = {
                var request = IdentityV1.ResolveRequest()
                request.identifiers = [id("email", "race\(round)@x.io")]
                request.createIfMissing = true
                return request
            }()
            let both = try await withThrowingTaskGroup(of: IdentityV1.ResolveResponse.self) { group in
                for _ in 0..<2 { group.addTask { try await service.resolve(request) } }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            // Before, both could say created (both read "unknown" before either wrote).
            #expect(both.count { $0.created } == 1 && both[0].personId == both[1].personId, "round \(round): \(both)")
            #expect(both.first { !$0.created }?.matched.map(\.value) == ["race\(round)@x.io"])
        }
    }
}

