import NIOCore
import NIOEmbedded
import RPC
import Testing

@Suite("ttrpc framing")
struct FramingTests {
    func frame(length: UInt32, stream: UInt32, type: UInt8, body: [UInt8]) -> [UInt8] {
        var buffer = ByteBuffer()
        buffer.writeInteger(length)
        buffer.writeInteger(stream)
        buffer.writeInteger(type)
        buffer.writeInteger(UInt8(0))
        buffer.writeBytes(body)
        return Array(buffer.readableBytesView)
    }

    func channel(max: Int = 16) throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(TTRPCFrameDecoder(maxPayloadSize: max)))
        try channel.pipeline.syncOperations.addHandler(MessageToByteHandler(TTRPCFrameEncoder()))
        return channel
    }

    @Test("frames split at every byte boundary are reassembled", arguments: [1, 2, 3, 7, 10, 11, 64])
    func reassembly(chunk: Int) throws {
        let channel = try channel()
        let bytes = frame(length: 3, stream: 1, type: 1, body: [1, 2, 3])
            + frame(length: 0, stream: 3, type: 1, body: [])
            + frame(length: 2, stream: 5, type: 2, body: [9, 9])
        for start in stride(from: 0, to: bytes.count, by: chunk) {
            try channel.writeInbound(ByteBuffer(bytes: bytes[start..<min(start + chunk, bytes.count)]))
        }
        let frames = try (0..<3).map { _ in try channel.readInbound(as: InboundFrame.self) }
        #expect(frames[0] == .frame(FrameHeader(length: 3, streamID: 1, kind: .request), ByteBuffer(bytes: [1, 2, 3])))
        #expect(frames[1] == .frame(FrameHeader(length: 0, streamID: 3, kind: .request), ByteBuffer()))
        #expect(frames[2] == .frame(FrameHeader(length: 2, streamID: 5, kind: .response), ByteBuffer(bytes: [9, 9])))
        #expect(try channel.readInbound(as: InboundFrame.self) == nil)
        _ = try channel.finish()
    }

    @Test("an oversize frame is reported from its header and its body skipped as it arrives")
    func oversize() throws {
        let channel = try channel(max: 16)
        try channel.writeInbound(ByteBuffer(bytes: frame(length: 1000, stream: 7, type: 1, body: [])))
        #expect(try channel.readInbound(as: InboundFrame.self) == .oversize(FrameHeader(length: 1000, streamID: 7, kind: .request)))
        // The body trickles in; nothing is emitted and nothing accumulates.
        for _ in 0..<10 {
            try channel.writeInbound(ByteBuffer(repeating: 0xEE, count: 99))
            #expect(try channel.readInbound(as: InboundFrame.self) == nil)
        }
        // The last 10 body bytes, then a normal frame in the same read.
        try channel.writeInbound(ByteBuffer(bytes: [UInt8](repeating: 0xEE, count: 10) + frame(length: 1, stream: 9, type: 1, body: [42])))
        #expect(try channel.readInbound(as: InboundFrame.self) == .frame(FrameHeader(length: 1, streamID: 9, kind: .request), ByteBuffer(bytes: [42])))
        _ = try channel.finish()
    }

    @Test("a header with an unknown frame type is an error", arguments: [0, 4, 0x47] as [UInt8])
    func garbage(type: UInt8) throws {
        let channel = try channel()
        #expect(throws: FramingError.self) {
            try channel.writeInbound(ByteBuffer(bytes: frame(length: 1, stream: 1, type: type, body: [0])))
        }
        _ = try? channel.finish()
    }

    @Test("the encoder writes the 10-byte big-endian header")
    func encoder() throws {
        let channel = try channel()
        try channel.writeOutbound(OutboundFrame(streamID: 0x0102_0304, kind: .response, payload: [0xAA, 0xBB]))
        let written = try #require(try channel.readOutbound(as: ByteBuffer.self))
        #expect(Array(written.readableBytesView) == [0, 0, 0, 2, 1, 2, 3, 4, 2, 0, 0xAA, 0xBB])
        _ = try channel.finish()
    }
}

@Suite("answer size")
struct AnswerSizeTests {
    @Test("a page takes the leading items that fit with their field overhead; the first always, unless told otherwise")
    func fitting() {
        #expect(AnswerSize.fitting([10, 10, 10], maxBytes: 32) == 2)  // 16 + 16
        #expect(AnswerSize.fitting([10, 10, 10], maxBytes: 31) == 1)
        #expect(AnswerSize.fitting([100, 1], maxBytes: 50) == 1)  // too large, but first: a pager moves on
        #expect(AnswerSize.fitting([100, 1], maxBytes: 50, atLeastOne: false) == 0)
        #expect(AnswerSize.fitting([Int](), maxBytes: 50) == 0)
    }
}
