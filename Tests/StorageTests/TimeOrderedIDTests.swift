import Storage
import Testing

@Suite("time-ordered ids")
struct TimeOrderedIDTests {
    @Test("ids made in one millisecond sort in the order they were made; later milliseconds sort after; each time's lower bound sorts below its ids")
    func order() {
        let ms: Int64 = 1_780_308_000_000
        let ids = TimeOrderedID.Sequence()  // not the process's: other tests make ids meanwhile
        // Before, the 16 digits after the time were random: ids of one millisecond sorted in
        // any order (a person's two decisions were read back either way).
        let sameMillisecond = (0..<10_000).map { _ in ids.make("d", nowMs: ms) }
        #expect(sameMillisecond == sameMillisecond.sorted() && Set(sameMillisecond).count == 10_000)
        let next = ids.make("d", nowMs: ms + 1)
        #expect(next > sameMillisecond.last! && next >= TimeOrderedID.lowerBound("d", atMs: ms + 1))
        #expect(sameMillisecond.allSatisfy { $0 >= TimeOrderedID.lowerBound("d", atMs: ms) && $0 < TimeOrderedID.lowerBound("d", atMs: ms + 1) })
        #expect(sameMillisecond.allSatisfy { $0.count == 1 + 12 + 16 && TimeOrderedID.isWellFormed($0, prefix: "d") })
        for bad in ["", "d", "x" + sameMillisecond[0].dropFirst(), sameMillisecond[0] + "0", String(sameMillisecond[0].dropLast()) + "G",
                    String(sameMillisecond[0].dropLast()) + "A"] {
            #expect(!TimeOrderedID.isWellFormed(bad, prefix: "d"), "\(bad)")
        }
        // A clock stepped back: the id carries the time it was given.
        let earlier = ids.make("d", nowMs: ms - 5_000)
        #expect(earlier.hasPrefix(TimeOrderedID.lowerBound("d", atMs: ms - 5_000)))
        // After a step back of the clock, ids of one millisecond are in order again.
        let stepped = (0..<100).map { _ in ids.make("d", nowMs: ms - 5_000) }
        #expect(stepped == stepped.sorted())
        // An id for a slightly earlier time in between (a caller that read the clock before
        // another) does not restart the latest millisecond's order.
        _ = ids.make("d", nowMs: ms + 1)
        for _ in 0..<200 {
            let a = ids.make("d", nowMs: ms + 1)
            _ = ids.make("d", nowMs: ms)
            let b = ids.make("d", nowMs: ms + 1)
            #expect(b > a)  // before, about half of these failed
        }
    }
}
