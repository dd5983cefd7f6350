defmodule UroRecs.Test.JSONTest do
  use ExUnit.Case, async: true

  alias UroRecs.Test.JSON

  test "decodes scalars, arrays and objects with string keys" do
    assert JSON.decode(~s( {"a": [1, -2, 0, 2.5, -0.125, 1e3, 1E-2, 3.0], "b": true,
                            "c": false, "d": null, "e": {}, "f": []} )) ==
             {:ok,
              %{
                "a" => [1, -2, 0, 2.5, -0.125, 1.0e3, 0.01, 3.0],
                "b" => true,
                "c" => false,
                "d" => nil,
                "e" => %{},
                "f" => []
              }}
  end

  test "numbers with a fraction or an exponent are floats, the others integers" do
    assert {:ok, [1, 1.0, 1.0e2, 18_446_744_073_709_551_615]} ===
             JSON.decode("[1, 1.0, 1e2, 18446744073709551615]")
  end

  test "ordered: true returns objects as pair lists in the order written" do
    assert JSON.decode(~s({"z": 1, "a": {"y": 2, "b": 3}, "m": [{"k": null}]}), ordered: true) ==
             {:ok,
              {:map,
               [
                 {"z", 1},
                 {"a", {:map, [{"y", 2}, {"b", 3}]}},
                 {"m", [{:map, [{"k", nil}]}]}
               ]}}
  end

  test "decodes every escape, \\u escapes and surrogate pairs" do
    assert JSON.decode(~S("\" \\ \/ \b \f \n \r \t \u00e9 \u20AC \ud83d\ude00 é")) ==
             {:ok, "\" \\ / \b \f \n \r \t é € 😀 é"}
  end

  test "rejects what strict JSON rejects" do
    for text <- [
          "",
          "[1,]",
          ~s({"a": 1,}),
          "01",
          "1.",
          ".5",
          "+1",
          "-",
          "[1 2]",
          ~s({"a" 1}),
          ~s({1: 2}),
          ~s("unterminated),
          ~s("tab\there"),
          ~S("\x"),
          ~S("\ud83d"),
          ~S("\ude00"),
          ~S("\u12G4"),
          "nul",
          "true false",
          "1e400",
          ~s({"a": 1, "a": 2}),
          <<?", 0xFF, ?">>
        ] do
      assert {:error, _} = JSON.decode(text), "expected an error for #{inspect(text)}"
    end
  end
end
