defmodule UroRecs.ZMTPTest do
  use ExUnit.Case, async: true

  alias UroRecs.ZMTP

  # The bytes of docs/PROTOCOL.md section 6, as written there.
  @our_ready "04 1c 05 52 45 41 44 59 0b 53 6f 63 6b 65 74 2d 54 79 70 65 00 00 00 06 44 45 41 4c 45 52"
  @broker_ready "04 29 05 52 45 41 44 59 0b 53 6f 63 6b 65 74 2d 54 79 70 65 00 00 00 06 52 4f 55 54 45 52 08 49 64 65 6e 74 69 74 79 00 00 00 00"
  @ping "04 0b 04 50 49 4e 47 00 64 63 74 78 31"
  @pong "04 09 04 50 4f 4e 47 63 74 78 31"
  # {"v":1,"id":1,"op":"stats"}
  @stats_body "83 a1 76 01 a2 69 64 01 a2 6f 70 a5 73 74 61 74 73"

  defp hex(text), do: Base.decode16!(String.replace(text, ~r/\s+/, ""), case: :mixed)

  defp broker_greeting(major \\ 3, minor \\ 1, mechanism \\ "NULL") do
    padded = mechanism <> :binary.copy(<<0>>, 20 - byte_size(mechanism))

    <<0xFF, 0, 0, 0, 0, 0, 0, 0, 1, 0x7F, major, minor, padded::binary, 0,
      :binary.copy(<<0>>, 31)::binary>>
  end

  defp bin(iodata), do: IO.iodata_to_binary(iodata)

  # Feeds `bytes` at once and returns the events; fails the test on an error.
  defp feed!(decoder, bytes) do
    assert {:ok, decoder, events} = ZMTP.feed(decoder, bytes)
    {decoder, events}
  end

  defp open_decoder(opts \\ []) do
    {decoder, [{:greeting, _}, {:ready, _}]} =
      feed!(ZMTP.new(opts), broker_greeting() <> hex(@broker_ready))

    assert ZMTP.phase(decoder) == :open
    decoder
  end

  defp feed_chunks(decoder, chunks) do
    Enum.reduce_while(chunks, {decoder, []}, fn chunk, {decoder, events} ->
      case ZMTP.feed(decoder, chunk) do
        {:ok, decoder, new} -> {:cont, {decoder, events ++ new}}
        {:error, reason} -> {:halt, {:error, reason}}
      end
    end)
  end

  defp bytes_of(binary), do: for(<<byte::binary-1 <- binary>>, do: byte)

  describe "what we send" do
    test "the greeting is the 64 bytes of section 6, version 3.0, NULL" do
      greeting = ZMTP.greeting()
      assert byte_size(greeting) == 64

      assert greeting ==
               hex("ff 00 00 00 00 00 00 00 01 7f 03 00 4e 55 4c 4c") <>
                 :binary.copy(<<0>>, 16) <> <<0>> <> :binary.copy(<<0>>, 31)
    end

    test "READY declares DEALER, byte for byte" do
      assert ZMTP.ready_command() == hex(@our_ready)
      assert ZMTP.ready_command("DEALER") == hex(@our_ready)
    end

    test "PING and PONG, byte for byte" do
      assert ZMTP.ping(100, "ctx1") == hex(@ping)
      assert ZMTP.pong("ctx1") == hex(@pong)
      assert ZMTP.ping(0, "") == <<4, 7, 4, "PING", 0, 0>>
    end

    test "PING refuses a context over 16 bytes and a TTL over 16 bits" do
      assert_raise FunctionClauseError, fn -> ZMTP.ping(10, :binary.copy("x", 17)) end
      assert_raise FunctionClauseError, fn -> ZMTP.ping(65_536, "") end
    end

    test "a short request: delimiter with MORE, then a 1-byte size" do
      body = hex(@stats_body)
      assert bin(ZMTP.encode_request(body)) == <<0x01, 0x00, 0x00, byte_size(body)>> <> body
    end

    test "a request of 256 bytes or more uses the 8-byte size" do
      body = :binary.copy("b", 300)

      assert bin(ZMTP.encode_request(body)) ==
               <<0x01, 0x00, 0x02, 0, 0, 0, 0, 0, 0, 0x01, 0x2C>> <> body
    end

    test "255 bytes is still short, 256 is long" do
      assert <<1, 0, 0, 255, _::binary-255>> = bin(ZMTP.encode_request(:binary.copy("x", 255)))

      assert <<1, 0, 2, 256::64, _::binary-256>> =
               bin(ZMTP.encode_request(:binary.copy("x", 256)))
    end

    test "a multi-frame message: MORE on all but the last, iodata frames" do
      encoded = bin(ZMTP.encode_message(["a", ["b", "c"], :binary.copy("d", 256)]))

      assert encoded ==
               <<1, 1, "a", 1, 2, "bc", 2, 256::64>> <> :binary.copy("d", 256)

      assert bin(ZMTP.encode_message(["only"])) == <<0, 4, "only">>
      assert_raise FunctionClauseError, fn -> ZMTP.encode_message([]) end
    end
  end

  describe "the handshake" do
    test "the broker's greeting (3.1) and READY of section 6" do
      decoder = ZMTP.new()
      assert ZMTP.phase(decoder) == :greeting

      {decoder, events} = feed!(decoder, broker_greeting())

      assert events == [
               {:greeting, %{major: 3, minor: 1, mechanism: "NULL", as_server: false}}
             ]

      assert ZMTP.phase(decoder) == :ready

      {decoder, events} = feed!(decoder, hex(@broker_ready))
      assert events == [{:ready, %{"Socket-Type" => "ROUTER", "Identity" => ""}}]
      assert ZMTP.phase(decoder) == :open
    end

    test "a 3.0 greeting is accepted too" do
      assert {_, [{:greeting, %{major: 3, minor: 0}}]} = feed!(ZMTP.new(), broker_greeting(3, 0))
    end

    test "a bad signature is refused from its first 10 bytes" do
      assert {:error, {:bad_signature, _}} =
               ZMTP.feed(ZMTP.new(), hex("ff 00 00 00 00 00 00 00 01 7e"))

      assert {:error, {:bad_signature, _}} = ZMTP.feed(ZMTP.new(), "GET / HTTP/1.1\r\n")
    end

    test "major version 2 is refused" do
      assert {:error, {:unsupported_version, 2, 0}} = ZMTP.feed(ZMTP.new(), broker_greeting(2, 0))
    end

    test "a mechanism other than NULL is refused" do
      assert {:error, {:unsupported_mechanism, "CURVE"}} =
               ZMTP.feed(ZMTP.new(), broker_greeting(3, 1, "CURVE"))

      assert {:error, {:unsupported_mechanism, "PLAIN"}} =
               ZMTP.feed(ZMTP.new(), broker_greeting(3, 1, "PLAIN"))
    end

    test "a READY with Socket-Type PUB is refused" do
      ready = IO.iodata_to_binary(ZMTP.ready_command("PUB"))

      assert {:error, {:bad_socket_type, "PUB"}} =
               ZMTP.feed(ZMTP.new(), broker_greeting() <> ready)
    end

    test "a READY without Socket-Type is refused" do
      ready = <<4, 6, 5, "READY">>

      assert {:error, {:bad_socket_type, nil}} = ZMTP.feed(ZMTP.new(), broker_greeting() <> ready)
    end

    test "properties are read in a loop, in any order, names case-insensitive" do
      body =
        <<5, "READY", 8, "Identity", 3::32, "abc", 4, "X-Hi", 0::32, 11, "socket-type", 6::32,
          "ROUTER">>

      assert {_, [_, {:ready, properties}]} =
               feed!(ZMTP.new(), broker_greeting() <> <<4, byte_size(body)>> <> body)

      assert properties == %{"Identity" => "abc", "X-Hi" => "", "socket-type" => "ROUTER"}
    end

    test "a READY whose properties overrun its body is refused" do
      body = <<5, "READY", 11, "Socket-Type", 7::32, "ROUTER">>

      assert {:error, {:malformed_command, "READY"}} =
               ZMTP.feed(ZMTP.new(), broker_greeting() <> <<4, byte_size(body)>> <> body)
    end

    test "a message before READY is refused" do
      assert {:error, :message_before_ready} =
               ZMTP.feed(ZMTP.new(), broker_greeting() <> <<1, 0>>)
    end

    test "a second READY is refused" do
      assert {:error, {:unexpected_command, "READY"}} =
               ZMTP.feed(open_decoder(), hex(@broker_ready))
    end

    test "an ERROR command during the handshake is reported" do
      assert {_, [_, {:error_command, "go away"}]} =
               feed!(ZMTP.new(), broker_greeting() <> <<4, 14, 5, "ERROR", 7, "go away">>)
    end
  end

  describe "commands" do
    test "PING from the peer, byte for byte, and PONG" do
      {decoder, events} = feed!(open_decoder(), hex(@ping))
      assert events == [{:ping, 100, "ctx1"}]
      assert {_, [{:pong, "ctx1"}]} = feed!(decoder, hex(@pong))
    end

    test "a PING too short for its TTL is refused" do
      assert {:error, {:malformed_command, "PING"}} =
               ZMTP.feed(open_decoder(), <<4, 6, 4, "PING", 0>>)
    end

    test "unknown commands are skipped" do
      assert {_, [{:message, ["", "x"]}]} =
               feed!(open_decoder(), <<4, 10, 9, "SUBSCRIBE", 1, 0, 0, 1, "x">>)
    end

    test "a command between the frames of a message does not disturb it" do
      bytes = <<1, 0>> <> hex(@ping) <> <<0, 2, "hi">>
      assert {_, [{:ping, 100, "ctx1"}, {:message, ["", "hi"]}]} = feed!(open_decoder(), bytes)
    end

    test "an empty command frame is malformed" do
      assert {:error, {:malformed_command, nil}} = ZMTP.feed(open_decoder(), <<4, 0>>)
    end

    test "a command with MORE, or reserved flag bits, is refused" do
      assert {:error, {:bad_flags, 5}} = ZMTP.feed(open_decoder(), hex(@ping) |> set_more())
      assert {:error, {:bad_flags, 0x08}} = ZMTP.feed(open_decoder(), <<0x08, 0>>)
    end

    defp set_more(<<flags, rest::binary>>), do: <<Bitwise.bor(flags, 1), rest::binary>>
  end

  describe "messages" do
    test "a short reply" do
      body = hex(@stats_body)
      {_, events} = feed!(open_decoder(), <<1, 0, 0, byte_size(body)>> <> body)
      assert events == [{:message, ["", body]}]
    end

    test "a long reply (8-byte size)" do
      body = :binary.copy(<<0x81, 0xA1, ?x, 0xC0>>, 100)
      {_, events} = feed!(open_decoder(), <<1, 0, 2, byte_size(body)::64>> <> body)
      assert events == [{:message, ["", body]}]
    end

    test "a small frame with the 8-byte size is accepted" do
      assert {_, [{:message, ["abc"]}]} = feed!(open_decoder(), <<2, 3::64, "abc">>)
    end

    test "what we encode decodes to the same frames, several messages in one chunk" do
      messages = [
        ["", "one"],
        ["", :binary.copy("L", 1000)],
        ["a", "", "b", :binary.copy("c", 256), ""],
        [""]
      ]

      bytes = bin(Enum.map(messages, &ZMTP.encode_message/1))
      {decoder, events} = feed!(open_decoder(), bytes)
      assert events == Enum.map(messages, &{:message, &1})
      # Nothing is left over: one more message decodes alone.
      assert {_, [{:message, ["z"]}]} = feed!(decoder, <<0, 1, "z">>)
    end

    test "a partial frame yields nothing until it is complete" do
      decoder = open_decoder()
      {decoder, []} = feed!(decoder, <<1, 0, 2, 300::64>>)
      {decoder, []} = feed!(decoder, :binary.copy("a", 299))
      assert {_, [{:message, ["", body]}]} = feed!(decoder, "a")
      assert body == :binary.copy("a", 300)
    end
  end

  describe "memory bounds" do
    test "an oversized frame is refused from its header, before its body arrives" do
      decoder = open_decoder(max_frame_size: 1000)

      {decoder, []} = feed!(decoder, <<1, 0>>)
      assert {:error, {:frame_too_large, 1001, 1000}} = ZMTP.feed(decoder, <<2, 1001::64>>)

      # 1000 is fine, and waits for its body.
      assert {:ok, _, []} = ZMTP.feed(decoder, <<2, 1000::64>>)
    end

    test "the default limit (64 MiB) refuses a header claiming 2^62 bytes" do
      assert {:error, {:frame_too_large, size, max}} =
               ZMTP.feed(open_decoder(), <<0x02, 0x40, 0, 0, 0, 0, 0, 0, 0>>)

      assert size == Bitwise.bsl(1, 62)
      assert max == 64 * 1024 * 1024

      assert {:error, {:frame_too_large, _, _}} =
               ZMTP.feed(open_decoder(), <<0x02, 64 * 1024 * 1024 + 1::64>>)
    end

    test "the header is enough even when it comes one byte at a time" do
      chunks = bytes_of(<<0x02, 5000::64>>)

      assert {:error, {:frame_too_large, 5000, 4096}} =
               feed_chunks(open_decoder(max_frame_size: 4096), chunks)
    end

    test "an oversized command is refused too" do
      assert {:error, {:frame_too_large, 300, 200}} =
               ZMTP.feed(ZMTP.new(max_frame_size: 200), broker_greeting() <> <<6, 300::64>>)
    end

    test "the frames of one message are bounded in number and total size" do
      assert {:error, {:too_many_frames, 3}} =
               ZMTP.feed(open_decoder(max_frames: 3), <<1, 0, 1, 0, 1, 0, 1, 0>>)

      assert {:ok, _, [{:message, ["", "", ""]}]} =
               ZMTP.feed(open_decoder(max_frames: 3), <<1, 0, 1, 0, 0, 0>>)

      assert {:error, {:message_too_large, 120, 100}} =
               ZMTP.feed(
                 open_decoder(max_message_size: 100),
                 <<1, 60>> <> :binary.copy("a", 60) <> <<0, 60>>
               )

      # The count and size start again with each message.
      bytes = bin([ZMTP.encode_message(["", "abc"]), ZMTP.encode_message(["", "abc"])])

      assert {:ok, _, [_, _]} = ZMTP.feed(open_decoder(max_frames: 2, max_message_size: 3), bytes)
    end

    test "new/1 checks its options" do
      assert_raise ArgumentError, fn -> ZMTP.new(max_frames: 0) end
      assert_raise ArgumentError, fn -> ZMTP.new(max_frame_size: -1) end
      assert_raise ArgumentError, fn -> ZMTP.new(bogus: 1) end
    end
  end

  describe "chunking" do
    # A whole broker session: greeting, READY, a short reply, a PING, a long reply.
    defp session do
      short = hex(@stats_body)
      long = <<0x81, 0xA1, ?k, 0xDA, 400::16>> <> :binary.copy("v", 400)

      bytes =
        bin([
          broker_greeting(),
          hex(@broker_ready),
          ZMTP.encode_request(short),
          hex(@ping),
          ZMTP.encode_request(long)
        ])

      expected = [
        {:greeting, %{major: 3, minor: 1, mechanism: "NULL", as_server: false}},
        {:ready, %{"Socket-Type" => "ROUTER", "Identity" => ""}},
        {:message, ["", short]},
        {:ping, 100, "ctx1"},
        {:message, ["", long]}
      ]

      {bytes, expected}
    end

    defp random_chunks(<<>>, acc), do: Enum.reverse(acc)

    defp random_chunks(bytes, acc) do
      # Mostly small chunks, sometimes large ones, sometimes empty ones.
      size = min(byte_size(bytes), Enum.random([0, 1, 2, 3, 7, 9, 64, :rand.uniform(600)]))
      <<chunk::binary-size(size), rest::binary>> = bytes
      random_chunks(rest, [chunk | acc])
    end

    test "at once" do
      {bytes, expected} = session()
      assert {_, ^expected} = feed!(ZMTP.new(), bytes)
    end

    test "one byte at a time" do
      {bytes, expected} = session()
      assert {_, ^expected} = feed_chunks(ZMTP.new(), bytes_of(bytes))
    end

    test "random splits give the same events (fixed seed, 500 splits)" do
      {bytes, expected} = session()
      :rand.seed(:exsss, {20, 26, 6})

      for _ <- 1..500 do
        chunks = random_chunks(bytes, [])
        assert IO.iodata_to_binary(chunks) == bytes
        assert {_, events} = feed_chunks(ZMTP.new(), chunks)
        assert events == expected, "split #{inspect(Enum.map(chunks, &byte_size/1))}"
      end
    end

    test "an error in a later chunk is still an error" do
      {bytes, _} = session()
      chunks = bytes_of(bytes) ++ [<<0x80, 0>>]
      assert {:error, {:bad_flags, 0x80}} = feed_chunks(ZMTP.new(), chunks)
    end
  end

  describe "against the broker" do
    @describetag :live

    @tag timeout: 15_000
    test "handshake, PING, and a stats request" do
      path = System.get_env("URO_RECS_BROKER_IPC")
      assert path not in [nil, ""], "set URO_RECS_BROKER_IPC to the broker's client.sock"

      {:ok, socket} = :gen_tcp.connect({:local, path}, 0, [:binary, active: false], 5_000)

      try do
        :ok = :gen_tcp.send(socket, [ZMTP.greeting(), ZMTP.ready_command()])

        {decoder, events} =
          receive_until(
            socket,
            ZMTP.new(),
            [],
            &Enum.any?(&1, fn e -> match?({:ready, _}, e) end)
          )

        assert [{:greeting, %{major: 3, mechanism: "NULL"}}, {:ready, properties}] = events
        assert properties["Socket-Type"] == "ROUTER"

        :ok =
          :gen_tcp.send(socket, [ZMTP.ping(100, "ex1"), ZMTP.encode_request(hex(@stats_body))])

        {_decoder, events} =
          receive_until(socket, decoder, [], fn seen ->
            {:pong, "ex1"} in seen and Enum.any?(seen, &match?({:message, _}, &1))
          end)

        assert {:pong, "ex1"} in events
        assert [{:message, ["", body]}] = Enum.filter(events, &match?({:message, _}, &1))
        # A msgpack map: fixmap, map16 or map32.
        assert <<first, _::binary>> = body
        assert first in 0x80..0x8F or first in [0xDE, 0xDF]
        assert :binary.match(body, <<0xA2, "ok", 0xC3>>) != :nomatch
      after
        :gen_tcp.close(socket)
      end
    end

    defp receive_until(socket, decoder, seen, done?) do
      {:ok, bytes} = :gen_tcp.recv(socket, 0, 5_000)
      {:ok, decoder, events} = ZMTP.feed(decoder, bytes)
      seen = seen ++ events

      for {:ping, _ttl, context} <- events, do: :ok = :gen_tcp.send(socket, ZMTP.pong(context))

      if done?.(seen),
        do: {decoder, seen},
        else: receive_until(socket, decoder, seen, done?)
    end
  end
end
