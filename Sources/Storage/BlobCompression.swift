import CLZ4
import Foundation

/// Large, repetitive blobs (the decision log's records) stored compressed with LZ4's block
/// format: every byte a store writes goes through the WAL and again through a checkpoint,
/// so fewer bytes cost less CPU in the kernel and less I/O. A compressed blob is one marker
/// byte (0), the original length (UInt32, little-endian), then the LZ4 block.
///
/// The marker tells compressed blobs from plain ones stored before: a protobuf message
/// never starts with a zero byte (field number 0 is invalid), so plain messages read back
/// unchanged.
public enum BlobCompression {
    static let marker: UInt8 = 0
    static let headerSize = 5
    /// A blob decompresses to at most this (64 MiB): a damaged length cannot make a reader
    /// allocate more.
    public static let maxSize = 64 << 20

    public enum Error: Swift.Error, Equatable, CustomStringConvertible {
        case damaged(String)
        public var description: String {
            switch self {
            case .damaged(let why): "compressed blob is damaged: \(why)"
            }
        }
    }

    /// `bytes` compressed; unchanged when that would not make them smaller (and they do not
    /// start with the marker, as no protobuf message does).
    public static func compress(_ bytes: [UInt8]) -> [UInt8] {
        guard !bytes.isEmpty, bytes.count <= maxSize else { return bytes }
        let bound = Int(LZ4_compressBound(Int32(bytes.count)))
        var out = [UInt8](repeating: 0, count: headerSize + bound)
        let written = bytes.withUnsafeBytes { source in
            out.withUnsafeMutableBytes { target in
                LZ4_compress_default(source.baseAddress!.assumingMemoryBound(to: CChar.self),
                                     target.baseAddress!.advanced(by: headerSize).assumingMemoryBound(to: CChar.self),
                                     Int32(bytes.count), Int32(bound))
            }
        }
        guard written > 0, Int(written) + headerSize < bytes.count || bytes[0] == marker else { return bytes }
        out[0] = marker
        let length = UInt32(bytes.count)
        for i in 0..<4 { out[1 + i] = UInt8(truncatingIfNeeded: length >> (8 * UInt32(i))) }
        out.removeLast(out.count - headerSize - Int(written))
        return out
    }

    /// The bytes `compress` was given: a blob that starts with the marker is decompressed,
    /// any other is returned as it is.
    public static func decompress(_ blob: some Collection<UInt8> & ContiguousBytes) throws(Error) -> [UInt8] {
        guard blob.first == marker else { return Array(blob) }
        guard blob.count > headerSize else { throw .damaged("\(blob.count) bytes are shorter than its header") }
        let result: Result<[UInt8], Error> = blob.withUnsafeBytes { raw in
            var length = 0
            for i in 0..<4 { length |= Int(raw[1 + i]) << (8 * i) }
            guard length > 0, length <= maxSize else { return .failure(.damaged("its length \(length) is out of range")) }
            var out = [UInt8](repeating: 0, count: length)
            let read = out.withUnsafeMutableBytes { target in
                LZ4_decompress_safe(raw.baseAddress!.advanced(by: headerSize).assumingMemoryBound(to: CChar.self),
                                    target.baseAddress!.assumingMemoryBound(to: CChar.self),
                                    Int32(raw.count - headerSize), Int32(length))
            }
            guard read == Int32(length) else { return .failure(.damaged("it decodes to \(read) bytes, not \(length)")) }
            return .success(out)
        }
        return try result.get()
    }
}
