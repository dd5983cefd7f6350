defmodule UroRecs.MsgpackTest do
  use ExUnit.Case, async: true

  alias UroRecs.Msgpack
  alias UroRecs.Test.JSON

  doctest UroRecs.Msgpack

  # The vectors are read once, at compile time, so that each one is a test of its own.
  @vectors_path Path.expand("../../../docs/vectors/v1.json", __DIR__)
  @external_resource @vectors_path
  {:ok, vectors} = JSON.decode(File.read!(@vectors_path), ordered: true)
  {:map, sections} = vectors
  @requests sections |> List.keyfind!("requests", 0) |> elem(1)
  @replies sections |> List.keyfind!("replies", 0) |> elem(1)
  @malformed sections |> List.keyfind!("malformed", 0) |> elem(1)

  # The reference encoder (Python, insertion order) writes requests' keys in this order, and
  # the maps below them (args, result) in the order the vector file writes them.
  @request_order ~w(v id op model args timeout_ms)
  @reply_order ~w(v id ok result error)
  @error_order ~w(code message retry)

  defp field({:map, pairs}, key), do: pairs |> List.keyfind!(key, 0) |> elem(1)

  # An ordered JSON value as the plain terms decode/1 returns.
  defp plain({:map, pairs}), do: Map.new(pairs, fn {k, v} -> {k, plain(v)} end)
  defp plain(list) when is_list(list), do: Enum.map(list, &plain/1)
  defp plain(other), do: other

  # The top-level keys in the reference order; every key of the value must be one of them.
  defp in_order({:map, pairs}, order) do
    assert Enum.map(pairs, &elem(&1, 0)) -- order == []
    {:map, for(key <- order, pair = List.keyfind(pairs, key, 0), do: pair)}
  end

  defp request_reference(value), do: in_order(value, @request_order)

  defp reply_reference(value) do
    {:map, pairs} = in_order(value, @reply_order)

    {:map,
     Enum.map(pairs, fn
       {"error", error} -> {"error", in_order(error, @error_order)}
       pair -> pair
     end)}
  end

  defp hex!(hex), do: Base.decode16!(hex, case: :mixed)

  defp encode_bin!(term) do
    {:ok, iodata} = Msgpack.encode(term)
    IO.iodata_to_binary(iodata)
  end

  describe "docs/vectors/v1.json" do
    test "has requests, replies and malformed vectors" do
      assert length(@requests) >= 8
      assert length(@replies) >= 7
      assert length(@malformed) >= 50
    end

    for {kind, vectors} <- [{"request", @requests}, {"reply", @replies}], vector <- vectors do
      {:map, vector_pairs} = vector
      name = vector_pairs |> List.keyfind!("name", 0) |> elem(1)
      @vector vector
      @kind kind

      test "#{kind} #{name}: decodes to its value and encodes back byte for byte" do
        body = hex!(field(@vector, "body_hex"))
        value = field(@vector, "value")

        # === tells 1 from 1.0: the JSON's ints and floats must come back as such.
        assert Msgpack.decode(body) === {:ok, plain(value)}

        reference =
          if @kind == "request", do: request_reference(value), else: reply_reference(value)

        assert Msgpack.encode!(reference) == body
        assert encode_bin!(reference) == body

        # Any other key order is valid too: encoding the plain map decodes to the same value.
        assert Msgpack.decode(Msgpack.encode!(plain(value))) === {:ok, plain(value)}
      end

      test "#{kind} #{name}: every truncation is :truncated" do
        body = hex!(field(@vector, "body_hex"))

        for size <- 0..(byte_size(body) - 1) do
          assert Msgpack.decode(binary_part(body, 0, size)) == {:error, :truncated},
                 "prefix of #{size} bytes"
        end
      end
    end

    # What the decoder itself makes of the malformed bodies whose fault is at the msgpack
    # level; the others are valid msgpack that the broker refuses for what they hold.
    @malformed_expectations %{
      "not_msgpack" => {:error, {:invalid_type, 0xC1}},
      "truncated_msgpack" => {:error, :truncated},
      "trailing_bytes" => {:error, :trailing_bytes},
      "invalid_utf8" => {:error, :invalid_utf8},
      "nested_past_limit" => {:error, :max_depth},
      "nested_1000_deep" => {:error, :max_depth},
      "int_map_key" => {:ok, %{1 => 2}},
      "bin_key" => {:ok, %{{:bin, "v"} => 1, {:bin, "id"} => 1, {:bin, "op"} => {:bin, "stats"}}},
      "three_frames" => {:error, :trailing_bytes}
    }

    for vector <- @malformed do
      {:map, vector_pairs} = vector
      name = vector_pairs |> List.keyfind!("name", 0) |> elem(1)
      @vector vector
      test "malformed #{name}: decoding its body frame never raises" do
        body = @vector |> field("frames_hex") |> List.last() |> hex!()
        result = Msgpack.decode(body)
        assert match?({:ok, _}, result) or match?({:error, _}, result)

        case Map.fetch(@malformed_expectations, field(@vector, "name")) do
          {:ok, expected} -> assert result === expected
          :error -> :ok
        end
      end
    end

    test "the specific malformed bodies decode as expected" do
      by_name = Map.new(@malformed, &{field(&1, "name"), &1})
      body = fn name -> by_name |> Map.fetch!(name) |> field("frames_hex") |> List.last() end

      assert {:error, {:ext, _}} = Msgpack.decode(hex!(body.("ext_type")))

      assert {:ok, %{"id" => 18_446_744_073_709_551_615}} =
               Msgpack.decode(hex!(body.("id_over_int64")))

      assert {:ok, %{"id" => 1.5}} = Msgpack.decode(hex!(body.("float_id")))
      assert {:ok, %{"v" => _}} = Msgpack.decode(hex!(body.("nested_1000_deep")), max_depth: 1024)

      assert {:ok, %{"pad" => pad}} =
               Msgpack.decode(hex!(body.("too_many_containers")), max_containers: 4000)

      assert length(pad) == 3000

      assert Msgpack.decode(hex!(body.("too_many_containers")), max_containers: 2048) ==
               {:error, :max_containers}

      assert %{"weight" => :nan} =
               hex!(body.("ingest_weight_nan"))
               |> Msgpack.decode!()
               |> get_in(["args", "events"])
               |> hd()
    end
  end

  describe "encode/1 writes the smallest width, byte for byte" do
    @known [
      {nil, "c0"},
      {false, "c2"},
      {true, "c3"},
      {0, "00"},
      {127, "7f"},
      {128, "cc80"},
      {255, "ccff"},
      {256, "cd0100"},
      {65_535, "cdffff"},
      {65_536, "ce00010000"},
      {4_294_967_295, "ceffffffff"},
      {4_294_967_296, "cf0000000100000000"},
      {18_446_744_073_709_551_615, "cfffffffffffffffff"},
      {-1, "ff"},
      {-32, "e0"},
      {-33, "d0df"},
      {-128, "d080"},
      {-129, "d1ff7f"},
      {-32_768, "d18000"},
      {-32_769, "d2ffff7fff"},
      {-2_147_483_648, "d280000000"},
      {-2_147_483_649, "d3ffffffff7fffffff"},
      {-9_223_372_036_854_775_808, "d38000000000000000"},
      {1.5, "cb3ff8000000000000"},
      {0.0, "cb0000000000000000"},
      {-2.5, "cbc004000000000000"},
      {"", "a0"},
      {"a", "a161"},
      {"é", "a2c3a9"},
      {:info, "a4696e666f"},
      {{:bin, ""}, "c400"},
      {{:bin, <<1, 2>>}, "c4020102"},
      {[], "90"},
      {[1, [2]], "920191 02" |> String.replace(" ", "")},
      {%{}, "80"},
      {%{"a" => 1}, "81a16101"},
      {%{a: nil}, "81a161c0"},
      {{:map, [{"b", 1}, {"a", 2}]}, "82a16201a16102"},
      {{:map, []}, "80"}
    ]

    for {term, hex} <- @known do
      @term term
      @hex hex
      test "#{inspect(term)} -> #{hex}" do
        assert Msgpack.encode!(@term) == hex!(@hex)
      end
    end

    test "str, bin, array and map headers at every width" do
      for {size, str_header, bin_header, array_header, map_header} <- [
            {0, <<0xA0>>, <<0xC4, 0>>, <<0x90>>, <<0x80>>},
            {15, <<0xAF>>, <<0xC4, 15>>, <<0x9F>>, <<0x8F>>},
            {16, <<0xB0>>, <<0xC4, 16>>, <<0xDC, 0, 16>>, <<0xDE, 0, 16>>},
            {31, <<0xBF>>, <<0xC4, 31>>, <<0xDC, 0, 31>>, <<0xDE, 0, 31>>},
            {32, <<0xD9, 32>>, <<0xC4, 32>>, <<0xDC, 0, 32>>, <<0xDE, 0, 32>>},
            {255, <<0xD9, 255>>, <<0xC4, 255>>, <<0xDC, 0, 255>>, <<0xDE, 0, 255>>},
            {256, <<0xDA, 1, 0>>, <<0xC5, 1, 0>>, <<0xDC, 1, 0>>, <<0xDE, 1, 0>>},
            {65_535, <<0xDA, 0xFF, 0xFF>>, <<0xC5, 0xFF, 0xFF>>, <<0xDC, 0xFF, 0xFF>>,
             <<0xDE, 0xFF, 0xFF>>},
            {65_536, <<0xDB, 0, 1, 0, 0>>, <<0xC6, 0, 1, 0, 0>>, <<0xDD, 0, 1, 0, 0>>,
             <<0xDF, 0, 1, 0, 0>>}
          ] do
        str = String.duplicate("x", size)
        assert Msgpack.encode!(str) == str_header <> str
        assert Msgpack.encode!({:bin, str}) == bin_header <> str

        array = List.duplicate(nil, size)
        assert Msgpack.encode!(array) == array_header <> :binary.copy(<<0xC0>>, size)

        pairs = for i <- 1..size//1, do: {i, nil}

        assert binary_part(Msgpack.encode!(Map.new(pairs)), 0, byte_size(map_header)) ==
                 map_header

        assert Msgpack.encode!({:map, pairs}) ==
                 IO.iodata_to_binary([
                   map_header
                   | Enum.map(pairs, fn {k, nil} -> [Msgpack.encode!(k), 0xC0] end)
                 ])
      end
    end

    test "str width is counted in bytes, not characters" do
      # 16 two-byte characters: 32 bytes, past fixstr.
      assert <<0xD9, 32, _::binary-size(32)>> = Msgpack.encode!(String.duplicate("é", 16))
    end
  end

  describe "encode/1 refuses what msgpack cannot carry, without raising" do
    test "unsupported terms" do
      pid = self()
      ref = make_ref()
      fun = fn -> :ok end

      for term <- [pid, ref, fun, {1, 2}, {}, {:bin, 1}, {:map, %{}}, <<1::3>>, %URI{}] do
        assert Msgpack.encode(term) == {:error, {:unsupported, term}}
      end

      assert Msgpack.encode([1 | 2]) == {:error, {:unsupported, [1 | 2]}}

      assert Msgpack.encode({:map, [{"a", 1}, :b]}) ==
               {:error, {:unsupported, {:map, [{"a", 1}, :b]}}}

      assert Msgpack.encode(%{"nested" => [1, %{"deep" => pid}]}) == {:error, {:unsupported, pid}}
      assert Msgpack.encode(%{{1, 2} => 1}) == {:error, {:unsupported, {1, 2}}}
    end

    test "integers outside -2^63..2^64-1" do
      for int <- [18_446_744_073_709_551_616, -9_223_372_036_854_775_809, 10 ** 40, -(10 ** 40)] do
        assert Msgpack.encode(int) == {:error, {:integer_out_of_range, int}}
      end
    end

    test "binaries that are not UTF-8 (raw bytes go in {:bin, _})" do
      for bytes <- [<<0xFF>>, <<0xC3, 0x28>>, <<0xED, 0xA0, 0x80>>, <<0xC0, 0x80>>] do
        assert Msgpack.encode(bytes) == {:error, {:invalid_utf8, bytes}}
        assert Msgpack.encode(%{"k" => [bytes]}) == {:error, {:invalid_utf8, bytes}}
        assert Msgpack.encode!({:bin, bytes}) == <<0xC4, byte_size(bytes)>> <> bytes
      end
    end

    test "encode!/1 raises UroRecs.Msgpack.EncodeError" do
      error = assert_raise Msgpack.EncodeError, fn -> Msgpack.encode!({1, 2}) end
      assert error.reason == {:unsupported, {1, 2}}
      assert Exception.message(error) =~ "cannot encode"
    end
  end

  describe "round trips" do
    defp round_trip(term), do: Msgpack.decode(Msgpack.encode!(term))

    test "nil, booleans and integers at every width boundary" do
      for term <-
            [nil, true, false] ++
              [
                0,
                1,
                127,
                128,
                255,
                256,
                65_535,
                65_536,
                2 ** 32 - 1,
                2 ** 32,
                2 ** 63,
                2 ** 64 - 1
              ] ++
              [-1, -32, -33, -128, -129, -32_768, -32_769, -(2 ** 31), -(2 ** 31) - 1, -(2 ** 63)] do
        assert round_trip(term) === {:ok, term}
      end
    end

    test "floats" do
      for float <- [
            0.0,
            -0.0,
            1.5,
            -2.5,
            0.1,
            1.0e300,
            -1.0e-300,
            5.0e-324,
            1.7976931348623157e308
          ] do
        assert round_trip(float) === {:ok, float}
      end
    end

    test "strings and binaries of every width" do
      for size <- [0, 1, 31, 32, 255, 256, 65_535, 65_536] do
        str = String.duplicate("s", size)
        assert round_trip(str) === {:ok, str}

        bin = :binary.copy(<<0xFF>>, size)
        assert round_trip({:bin, bin}) === {:ok, {:bin, bin}}
      end

      assert round_trip("uro-recs: é € 😀") === {:ok, "uro-recs: é € 😀"}
    end

    test "arrays and maps of every width" do
      for size <- [0, 1, 15, 16, 65_535, 65_536] do
        list = Enum.to_list(1..size//1)
        assert round_trip(list) === {:ok, list}

        map = Map.new(1..size//1, &{"k#{&1}", &1})
        assert round_trip(map) === {:ok, map}
        assert round_trip({:map, Enum.to_list(map)}) === {:ok, map}
      end
    end

    test "nested values, atoms and wrappers" do
      term = %{
        "v" => 1,
        "args" => %{"users" => ["6f1c1b9a", 42, -7], "n" => 10, "filter_consumed" => false},
        "scores" => [0.5, nil, -1.25],
        "blob" => {:bin, <<0, 1, 2, 255>>},
        "deep" => [[[[%{"x" => [[], %{}]}]]]],
        {:bin, "raw key"} => %{1 => 2, -1 => [true]}
      }

      assert round_trip(term) === {:ok, term}

      assert round_trip(%{op: :recommend, timeout_ms: 50}) ===
               {:ok, %{"op" => "recommend", "timeout_ms" => 50}}

      assert round_trip({:map, [{"outer", {:map, [{"inner", [{:map, [{"a", 1}]}]}]}}]}) ===
               {:ok, %{"outer" => %{"inner" => [%{"a" => 1}]}}}
    end
  end

  describe "decode/2 reads every msgpack form" do
    test "every integer width, including the wide forms of small values" do
      for {hex, int} <- [
            {"00", 0},
            {"7f", 127},
            {"ff", -1},
            {"e0", -32},
            {"cc05", 5},
            {"ccff", 255},
            {"cd0005", 5},
            {"cdffff", 65_535},
            {"ce00000005", 5},
            {"ceffffffff", 4_294_967_295},
            {"cf0000000000000005", 5},
            {"cfffffffffffffffff", 18_446_744_073_709_551_615},
            {"d005", 5},
            {"d080", -128},
            {"d1ffff", -1},
            {"d18000", -32_768},
            {"d2ffffffff", -1},
            {"d280000000", -2_147_483_648},
            {"d3ffffffffffffffff", -1},
            {"d38000000000000000", -9_223_372_036_854_775_808}
          ] do
        assert Msgpack.decode(hex!(hex)) === {:ok, int}, hex
      end
    end

    test "float32 and float64" do
      assert Msgpack.decode(<<0xCA, 1.5::float-32>>) === {:ok, 1.5}
      assert Msgpack.decode(<<0xCA, 0x3F800000::32>>) === {:ok, 1.0}
      assert Msgpack.decode(<<0xCA, -0.25::float-32>>) === {:ok, -0.25}
      assert {:ok, float} = Msgpack.decode(<<0xCA, 0.1::float-32>>)
      assert_in_delta float, 0.1, 1.0e-7
      assert Msgpack.decode(<<0xCB, 0.1::float-64>>) === {:ok, 0.1}
    end

    test "NaN and infinities, which BEAM floats cannot hold, decode to atoms" do
      assert Msgpack.decode(hex!("cb7ff8000000000000")) == {:ok, :nan}
      assert Msgpack.decode(hex!("cbfff8000000000001")) == {:ok, :nan}
      assert Msgpack.decode(hex!("cb7ff0000000000000")) == {:ok, :infinity}
      assert Msgpack.decode(hex!("cbfff0000000000000")) == {:ok, :neg_infinity}
      assert Msgpack.decode(hex!("ca7fc00000")) == {:ok, :nan}
      assert Msgpack.decode(hex!("ca7f800000")) == {:ok, :infinity}
      assert Msgpack.decode(hex!("caff800000")) == {:ok, :neg_infinity}
      assert Msgpack.decode(hex!("92cb7ff0000000000000c0")) == {:ok, [:infinity, nil]}
    end

    test "every str, bin, array and map width, including wide forms of short values" do
      assert Msgpack.decode(hex!("d90161")) == {:ok, "a"}
      assert Msgpack.decode(hex!("da000161")) == {:ok, "a"}
      assert Msgpack.decode(hex!("db0000000161")) == {:ok, "a"}
      assert Msgpack.decode(hex!("c40161")) == {:ok, {:bin, "a"}}
      assert Msgpack.decode(hex!("c5000161")) == {:ok, {:bin, "a"}}
      assert Msgpack.decode(hex!("c6000000016100")) == {:error, :trailing_bytes}
      assert Msgpack.decode(hex!("c60000000161")) == {:ok, {:bin, "a"}}
      assert Msgpack.decode(hex!("dc000101")) == {:ok, [1]}
      assert Msgpack.decode(hex!("dd0000000101")) == {:ok, [1]}
      assert Msgpack.decode(hex!("de0001a16101")) == {:ok, %{"a" => 1}}
      assert Msgpack.decode(hex!("df00000001a16101")) == {:ok, %{"a" => 1}}
      assert Msgpack.decode(hex!("dc0000")) == {:ok, []}
      assert Msgpack.decode(hex!("df00000000")) == {:ok, %{}}
    end

    test "a repeated map key keeps its last value, as Python does" do
      assert Msgpack.decode(hex!("82a16101a16102")) == {:ok, %{"a" => 2}}
    end

    test "decode!/2 returns the term or raises UroRecs.Msgpack.DecodeError" do
      assert Msgpack.decode!(<<0x91, 0x01>>) == [1]
      error = assert_raise Msgpack.DecodeError, fn -> Msgpack.decode!(<<0x91>>) end
      assert error.reason == :truncated
      assert Exception.message(error) =~ "truncated"
    end

    test "invalid options raise ArgumentError" do
      assert_raise ArgumentError, fn -> Msgpack.decode(<<0xC0>>, max_depth: -1) end
      assert_raise ArgumentError, fn -> Msgpack.decode(<<0xC0>>, max_containers: :infinity) end
    end
  end

  describe "decode/2 on hostile input returns an error quickly" do
    test "declared sizes beyond the bytes left are :truncated before anything is built" do
      # Fewer bytes than the smallest declared size below (255), each a complete value.
      filler = :binary.copy(<<0x01>>, 200)

      {elapsed_us, results} =
        :timer.tc(fn ->
          for header <- [
                <<0xDD, 0xFF, 0xFF, 0xFF, 0xFF>>,
                <<0xDF, 0xFF, 0xFF, 0xFF, 0xFF>>,
                <<0xDC, 0xFF, 0xFF>>,
                <<0xDE, 0xFF, 0xFF>>,
                <<0xDB, 0xFF, 0xFF, 0xFF, 0xFF>>,
                <<0xDA, 0xFF, 0xFF>>,
                <<0xD9, 0xFF>>,
                <<0xC6, 0xFF, 0xFF, 0xFF, 0xFF>>,
                <<0xC5, 0xFF, 0xFF>>,
                <<0x91, 0xDD, 0xFF, 0xFF, 0xFF, 0xFF>>,
                <<0x81, 0xA1, ?k, 0xDF, 0xFF, 0xFF, 0xFF, 0xFF>>
              ],
              bytes <- [header, header <> filler] do
            Msgpack.decode(bytes)
          end
        end)

      assert Enum.all?(results, &(&1 == {:error, :truncated})), inspect(results)
      assert elapsed_us < 1_000_000
    end

    test "a container's declared size is checked before its first element is read" do
      # Were the elements read first, 0xc1 would be the error.
      for header <- [<<0x93>>, <<0xDC, 0, 3>>, <<0xDD, 0xFF, 0xFF, 0xFF, 0xFF>>, <<0x82, 0xC0>>] do
        assert Msgpack.decode(header <> <<0xC1>>) == {:error, :truncated}, inspect(header)
      end
    end

    test "a map declaring more entries than pairs of bytes left is :truncated" do
      # 3 entries need at least 6 bytes; 5 are there.
      assert Msgpack.decode(<<0x83, 1, 2, 3, 4, 5>>) == {:error, :truncated}
    end

    test "nesting past :max_depth is refused" do
      nested = fn depth -> :binary.copy(<<0x91>>, depth) <> <<0xC0>> end
      deep = fn depth -> Enum.reduce(1..depth, nil, fn _, acc -> [acc] end) end

      assert Msgpack.decode(nested.(64)) == {:ok, deep.(64)}
      assert Msgpack.decode(nested.(65)) == {:error, :max_depth}
      assert Msgpack.decode(:binary.copy(<<0x91>>, 64) <> <<0x90>>) == {:error, :max_depth}
      assert Msgpack.decode(:binary.copy(<<0x81, 0xC0>>, 65) <> <<0xC0>>) == {:error, :max_depth}
      assert Msgpack.decode(nested.(10), max_depth: 9) == {:error, :max_depth}
      assert Msgpack.decode(nested.(10), max_depth: 10) == {:ok, deep.(10)}
      assert Msgpack.decode(<<0x90>>, max_depth: 0) == {:error, :max_depth}
      assert Msgpack.decode(<<0x01>>, max_depth: 0) == {:ok, 1}

      {elapsed_us, result} = :timer.tc(fn -> Msgpack.decode(nested.(5_000_000)) end)
      assert result == {:error, :max_depth}
      assert elapsed_us < 1_000_000

      assert {:ok, _} = Msgpack.decode(nested.(10_000), max_depth: 10_000)
    end

    test "more containers than :max_containers are refused" do
      many = <<0xDC, 1000::16>> <> :binary.copy(<<0x90>>, 1000)
      assert Msgpack.decode(many, max_containers: 1001) == {:ok, List.duplicate([], 1000)}
      assert Msgpack.decode(many, max_containers: 1000) == {:error, :max_containers}
      assert Msgpack.decode(many, max_containers: 100) == {:error, :max_containers}
      assert Msgpack.decode(<<0x80>>, max_containers: 0) == {:error, :max_containers}

      flood = <<0xDD, 200_000::32>> <> :binary.copy(<<0x80>>, 200_000)
      assert Msgpack.decode(flood) == {:error, :max_containers}
    end

    test "invalid UTF-8 in a str, anywhere" do
      for bad <- [
            <<0xFF>>,
            <<0xC3, 0x28>>,
            <<0xC0, 0x80>>,
            <<0xED, 0xA0, 0x80>>,
            <<0xF4, 0x90, 0x80, 0x80>>,
            <<0xE2, 0x82>>
          ] do
        str = <<0b101::3, byte_size(bad)::5>> <> bad
        assert Msgpack.decode(str) == {:error, :invalid_utf8}
        assert Msgpack.decode(<<0x81>> <> str <> <<0x01>>) == {:error, :invalid_utf8}
        assert Msgpack.decode(<<0x81, 0xA1, ?k>> <> str) == {:error, :invalid_utf8}
        assert Msgpack.decode(<<0x92, 0x01>> <> str) == {:error, :invalid_utf8}
        # The same bytes as bin are fine.
        assert Msgpack.decode(<<0xC4, byte_size(bad)>> <> bad) == {:ok, {:bin, bad}}
      end
    end

    test "0xc1 is refused wherever it appears" do
      assert Msgpack.decode(<<0xC1>>) == {:error, {:invalid_type, 0xC1}}
      assert Msgpack.decode(<<0x92, 0x01, 0xC1>>) == {:error, {:invalid_type, 0xC1}}
      assert Msgpack.decode(<<0x81, 0xC1, 0x01>>) == {:error, {:invalid_type, 0xC1}}
    end

    test "every ext form is refused with its type" do
      for {bytes, type} <- [
            {<<0xD4, 1, 0>>, 1},
            {<<0xD5, 2, 0, 0>>, 2},
            {<<0xD6, 0xFF, 0, 0, 0, 0>>, -1},
            {<<0xD7, 0xFF, 0::64>>, -1},
            {<<0xD8, 5, 0::128>>, 5},
            {<<0xC7, 3, 7, 1, 2, 3>>, 7},
            {<<0xC8, 0, 1, 8, 1>>, 8},
            {<<0xC9, 0, 0, 0, 1, 0x80, 1>>, -128},
            {<<0x91, 0xD6, 0xFF, 0::32>>, -1}
          ] do
        assert Msgpack.decode(bytes) == {:error, {:ext, type}}
      end
    end

    test "trailing bytes and empty input" do
      assert Msgpack.decode(<<>>) == {:error, :truncated}
      assert Msgpack.decode(<<0xC0, 0xC0>>) == {:error, :trailing_bytes}
      assert Msgpack.decode(<<0x91, 0x01, 0x02>>) == {:error, :trailing_bytes}
      assert Msgpack.decode(:not_a_binary) == {:error, :not_a_binary}
      assert Msgpack.decode(<<1::3>>) == {:error, :not_a_binary}
    end

    test "truncation at every byte of a message holding every type" do
      message =
        Msgpack.encode!(
          {:map,
           [
             {"ints",
              [0, 127, 128, 256, 65_536, 2 ** 32, -1, -33, -129, -32_769, -(2 ** 31) - 1]},
             {"floats", [1.5, -0.0]},
             {"strs", ["", "a", String.duplicate("b", 40), String.duplicate("c", 300)]},
             {"bins", [{:bin, ""}, {:bin, <<1, 2>>}, {:bin, :binary.copy(<<0>>, 300)}]},
             {"array16", List.duplicate(true, 20)},
             {"map16", Map.new(1..20, &{&1, nil})},
             {"nested", [[%{"a" => [false]}]]}
           ]}
        )

      assert {:ok, _} = Msgpack.decode(message)

      for size <- 0..(byte_size(message) - 1) do
        assert Msgpack.decode(binary_part(message, 0, size)) == {:error, :truncated},
               "prefix of #{size} bytes"
      end
    end

    test "random and mutated bytes never raise, and what decodes re-encodes to the same value" do
      :rand.seed(:exsss, {1, 2, 3})
      bodies = Enum.map(@requests ++ @replies, &hex!(field(&1, "body_hex")))

      inputs =
        for _ <- 1..3000 do
          case :rand.uniform(3) do
            1 ->
              random_bytes(:rand.uniform(40))

            2 ->
              body = Enum.random(bodies)
              at = :rand.uniform(byte_size(body)) - 1
              <<before::binary-size(at), _, rest::binary>> = body
              before <> <<:rand.uniform(256) - 1>> <> rest

            3 ->
              <<Enum.random([0xDC, 0xDD, 0xDE, 0xDF, 0x9F, 0x8F, 0xD9, 0xC6])>> <>
                random_bytes(:rand.uniform(20))
          end
        end

      for input <- inputs do
        case Msgpack.decode(input) do
          {:ok, term} ->
            unless non_finite?(term) do
              assert Msgpack.decode(Msgpack.encode!(term)) === {:ok, term}, inspect(input)
            end

          {:error, _reason} ->
            :ok
        end
      end
    end
  end

  defp random_bytes(n), do: for(_ <- 1..n, into: <<>>, do: <<:rand.uniform(256) - 1>>)

  defp non_finite?(term) when term in [:nan, :infinity, :neg_infinity], do: true
  defp non_finite?(list) when is_list(list), do: Enum.any?(list, &non_finite?/1)

  defp non_finite?(map) when is_map(map),
    do: Enum.any?(map, fn {k, v} -> non_finite?(k) or non_finite?(v) end)

  defp non_finite?(_), do: false
end
