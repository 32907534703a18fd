import Storage
import Testing

@Suite("FIFOCache")
struct FIFOCacheTests {
    @Test("keeps the latest keys inserted, first in first out; an update keeps its place; a removed slot is reused in turn")
    func firstInFirstOut() {
        var cache = FIFOCache<String, Int>(capacity: 2)
        cache.insert("a", 1)
        cache.insert("b", 2)
        let updated = cache.insert("a", 10)  // an update: "a" is still the oldest
        #expect(!updated)
        #expect(cache["a"] == 10 && cache.count == 2)
        let pushed = cache.insert("c", 3)  // pushes "a" out
        #expect(pushed)
        #expect(cache["a"] == nil && cache["b"] == 2 && cache["c"] == 3)
        #expect(cache.remove("c") == 3 && cache.count == 1)
        cache.insert("d", 4)  // takes the slot of "b", the oldest
        #expect(cache["b"] == nil && cache["c"] == nil && cache["d"] == 4 && cache.count == 1)
        let reused = cache.insert("e", 5)  // the slot "c" left: nothing is pushed out
        #expect(!reused)
        #expect(cache["d"] == 4 && cache["e"] == 5 && cache.count == 2)

        let held = cache.takeAll()
        #expect(held["e"] == 5 && cache.count == 0 && cache["e"] == nil && cache.capacity == 2)
    }

    final class Tag: Hashable, Sendable {
        let id: Int
        init(_ id: Int) { self.id = id }
        static func == (a: Tag, b: Tag) -> Bool { a.id == b.id }
        func hash(into hasher: inout Hasher) { hasher.combine(id) }
    }

    @Test("a removed key leaves nothing behind: its copy is released at once, not when its slot comes round")
    func removedKeyReleased() {
        var cache = FIFOCache<Tag, Int>(capacity: 4)
        weak var held: Tag?
        do {
            let key = Tag(1)
            held = key
            cache.insert(key, 1)
            cache.insert(Tag(2), 2)
        }
        #expect(held != nil)
        cache.remove(Tag(1))
        #expect(held == nil && cache.count == 1)
    }

    @Test("with a cost limit, values that cost too much together push out the oldest, never the one just inserted; updates and removals count")
    func costLimited() {
        var cache = FIFOCache<String, String>(capacity: 10, costLimit: 10, cost: { $0.utf8.count })
        cache.insert("a", "xxxx")
        cache.insert("b", "xxxx")
        #expect(cache.totalCost == 8 && cache.count == 2)
        let pushed = cache.insert("c", "xxxx")  // 12 > 10: "a" goes
        #expect(pushed && cache["a"] == nil && cache["b"] != nil && cache.totalCost == 8)
        let grown = cache.insert("b", "xxxxxxxx")  // an update that costs more: "c" goes, not "b"
        #expect(grown && cache["c"] == nil && cache["b"] == "xxxxxxxx" && cache.totalCost == 8)
        let alone = cache.insert("d", String(repeating: "x", count: 20))  // past the limit alone: kept, alone
        #expect(alone && cache.count == 1 && cache["d"] != nil && cache.totalCost == 20)
        #expect(cache.remove("d") != nil && cache.totalCost == 0)
        // Whatever the mix, the costs stay those of what is held.
        var generator = SystemRandomNumberGenerator()
        for i in 0..<5_000 {
            let key = "k\(Int.random(in: 0..<40, using: &generator))"
            if i % 4 == 0 { cache.remove(key) } else { cache.insert(key, String(repeating: "y", count: Int.random(in: 0..<6, using: &generator))) }
            #expect(cache.count <= 10 && (cache.totalCost <= 10 || cache.count == 1))
        }
        #expect(cache.totalCost == (0..<40).reduce(0) { $0 + (cache["k\($1)"]?.utf8.count ?? 0) })
    }

    @Test("when the cost limit holds far fewer keys than the capacity, it keeps exactly the latest ones, round the ring many times")
    func costLimitFarBelowCapacity() {
        var cache = FIFOCache<Int, Int>(capacity: 10_000, costLimit: 100, cost: { _ in 1 })
        for key in 0..<30_000 { cache.insert(key, key) }
        #expect(cache.count == 100 && cache.totalCost == 100)
        #expect((29_900..<30_000).allSatisfy { cache[$0] == $0 } && cache[29_899] == nil)
        cache.remove(29_950)
        for key in 30_000..<30_050 { cache.insert(key, key) }
        // 99 held and 50 more: the 49 oldest went (29,900 to 29,948); the removed key is not back.
        #expect(cache.count == 100 && cache[29_949] == 29_949 && (29_951..<30_050).allSatisfy { cache[$0] == $0 })
        #expect(cache[29_948] == nil && cache[29_950] == nil)
    }

    @Test("never holds more than its capacity, whatever the mix of inserts and removals")
    func bounded() {
        var cache = FIFOCache<Int, Int>(capacity: 100)
        var generator = SystemRandomNumberGenerator()
        for i in 0..<20_000 {
            let key = Int.random(in: 0..<300, using: &generator)
            if i % 3 == 0 { cache.remove(key) } else { cache.insert(key, i) }
            #expect(cache.count <= 100)
        }
        var empty = FIFOCache<Int, Int>(capacity: 0)
        empty.insert(1, 1)
        #expect(empty[1] == nil)
    }
}
