import Foundation
import Storage
import Testing

@Suite("BlobCompression")
struct BlobCompressionTests {
    @Test("a repetitive blob comes back whole and smaller; one that does not shrink, or is not marked, passes through unchanged")
    func roundTrip() throws {
        let repetitive = Array((0..<200).map { "candidate \($0 % 7): eligibility: trait.tier == \"gold\"\n" }.joined().utf8)
        let compressed = BlobCompression.compress(repetitive)
        #expect(compressed.first == 0 && compressed.count < repetitive.count / 4)
        #expect(try BlobCompression.decompress(Data(compressed)) == repetitive)

        var generator = SystemRandomNumberGenerator()
        var noise = (0..<4096).map { _ in UInt8.random(in: 1...255, using: &generator) }
        #expect(BlobCompression.compress(noise) == noise)  // would not shrink: stored as it is
        #expect(try BlobCompression.decompress(Data(noise)) == noise)
        // A blob that starts with the marker is always compressed, so it reads back as itself.
        noise[0] = 0
        let marked = BlobCompression.compress(noise)
        #expect(marked != noise)
        #expect(try BlobCompression.decompress(Data(marked)) == noise)
        #expect(BlobCompression.compress([]) == [])
        #expect(try BlobCompression.decompress(Data()) == [])
    }

    @Test("a damaged blob is an error, never a crash or an oversized allocation")
    func damaged() throws {
        let blob = BlobCompression.compress(Array(String(repeating: "offer, offer, offer; ", count: 100).utf8))
        #expect(throws: BlobCompression.Error.self) { try BlobCompression.decompress(Data(blob.prefix(3))) }
        #expect(throws: BlobCompression.Error.self) { try BlobCompression.decompress(Data(blob.dropLast(4))) }
        var longer = blob
        longer[1] &+= 1  // the length says one byte more than the block holds
        #expect(throws: BlobCompression.Error.self) { try BlobCompression.decompress(Data(longer)) }
        var huge = blob
        huge[4] = 0xFF  // ~4 GiB: over maxSize
        #expect(throws: BlobCompression.Error.self) { try BlobCompression.decompress(Data(huge)) }
        var garbage = blob
        for i in 5..<garbage.count { garbage[i] = 0xFF }
        #expect(throws: BlobCompression.Error.self) { try BlobCompression.decompress(Data(garbage)) }
    }
}
